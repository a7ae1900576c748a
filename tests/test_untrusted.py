"""Files from strangers: nothing is unpickled, damaged files end in one clean UserError, chat
templates stay in their sandbox.

The readers of checkpoints (safetensors + JSON), GGUF files, tokenizer files and LoRA adapters
are fuzzed with hypothesis: each case takes a tiny valid file written here and damages it
(truncation, byte flips, structure-aware mutations of the safetensors header, the GGUF layout
and the JSON trees). Loading must either succeed or raise ``UserError`` with a one-line
message; anything else is a bug. The default run tries a few hundred cases;
``benchmarks/fuzz_readers.py`` runs the same targets for tens of thousands.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import resource
import shutil
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.lora import LoRAConfig, add_lora
from gptlab.model.transformer import GPT
from gptlab.tokenizers import BPETokenizer, CharTokenizer, load_tokenizer_file
from gptlab.tokenizers.bpe import bytes_to_unicode
from gptlab.tokenizers.chat_template import render_chat
from gptlab.weights import checkpoint as ckpt
from gptlab.weights.adapter import apply_adapter, load_adapter, save_adapter
from gptlab.weights.load import load_checkpoint

gguf = pytest.importorskip("gguf")
from gptlab.weights.gguf import GLOBAL_NAMES, LAYER_NAMES, import_gguf  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog; café 😀\n" * 20
SPECIALS = ["<|im_start|>", "<|im_end|>"]


# --- malicious pickles ----------------------------------------------------------------------------

class Exploit:
    """Unpickling this runs ``touch MARKER``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_files(marker: Path) -> dict[str, bytes]:
    """The two shapes a hostile train_state.pt takes: a raw pickle and torch's zip format."""
    zipped = Path(str(marker) + ".zip")
    torch.save({"step": Exploit(marker)}, zipped)
    return {"raw pickle": pickle.dumps({"step": Exploit(marker)}), "torch zip": zipped.read_bytes()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real run directory (4 steps of the tiny preset), so --resume gets past everything but the state."""
    from gptlab.config import resolve_config
    from gptlab.train.loop import train

    tmp = tmp_path_factory.mktemp("run")
    (tmp / "c.txt").write_text(TEXT)
    model_cfg, cfg = resolve_config("tiny", train_overrides={"corpus": str(tmp / "c.txt"), "max_steps": 4,
                                                             "eval_interval": 4})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTLAB_CACHE", str(tmp / "cache"))
        train(model_cfg, cfg, tmp / "run", show_progress=False)
    return tmp / "run"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("shape", ["raw pickle", "torch zip"])
def test_malicious_train_state_is_refused_by_resume(trained_run, tmp_path, shape, capsys, monkeypatch):
    from gptlab.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "pwned"
    (run / "last" / ckpt.TRAIN_STATE).write_bytes(hostile_files(marker)[shape])
    with pytest.raises(UserError, match="cannot be loaded safely") as e:
        ckpt.load_train_state(run / "last")
    assert "\n" not in str(e.value) and str(run / "last") in str(e.value)
    monkeypatch.setenv("GPTLAB_CACHE", str(trained_run.parent / "cache"))
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "cannot be loaded safely" in err[0]
    assert not marker.exists()


def test_malicious_sharded_optimizer_state_is_refused(tmp_path):
    """``--resume --fsdp`` reads last/distributed/ with torch.distributed.checkpoint, whose own
    reader unpickles ``.metadata``; gptlab reads it with an allow-list of classes first."""
    from gptlab.train.distributed import load_sharded_optimizer

    marker = tmp_path / "pwned"
    folder = tmp_path / "distributed"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(Exploit(marker)))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(UserError, match="cannot be loaded safely.*refusing posix.system") as e:
        load_sharded_optimizer(model, optimizer, folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["bytes entry", "path outside", "truncated"])
def test_sharded_optimizer_index_describing_other_things_is_refused(tmp_path, damage):
    """A well-formed index that points a tensor at a pickled value or at a file outside the
    folder is refused too: the one is loaded with ``torch.load(weights_only=False)`` by
    torch.distributed.checkpoint, the other is not part of the checkpoint."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    from gptlab.train.distributed import read_sharded_metadata

    index = MetadataIndex("optimizer.state.w.exp_avg")
    entries = {index.fqn: BytesStorageMetadata()} if damage == "bytes entry" else {}
    where = "../../elsewhere.bin" if damage == "path outside" else "__0_0.distcp"
    data = pickle.dumps(Metadata(entries, storage_data={index: _StorageInfo(where, 0, 8)}))
    (tmp_path / ".metadata").write_bytes(data[:len(data) // 2] if damage == "truncated" else data)
    with pytest.raises(UserError, match="refusing|cannot be loaded safely") as e:
        read_sharded_metadata(tmp_path)
    assert "\n" not in str(e.value)


def test_no_reader_unpickles():
    """Every torch.load in the package passes weights_only=True, and pickle is imported only to
    subclass ``pickle.Unpickler`` with an allow-list (``find_class``), never to call its loaders."""
    src = Path(__file__).resolve().parents[1] / "src" / "gptlab"
    loads, pickles = [], []
    for f in src.rglob("*.py"):
        text = f.read_text()
        restricted = "(pickle.Unpickler):" in text and "def find_class(" in text
        for i, line in enumerate(text.splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith(("#", "``")):
                loads.append(f"{f.name}:{i}")
            if (line.startswith(("from pickle", "import dill", "import joblib", "import cloudpickle"))
                    or (line.startswith("import pickle") and not restricted)
                    or "pickle.load(" in line or "pickle.loads(" in line):
                pickles.append(f"{f.name}:{i}")
    assert loads == [] and pickles == []
    assert "torch.load(f, map_location=\"cpu\", weights_only=True)" in (src / "weights" / "checkpoint.py").read_text()


# --- chat templates ---------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('true') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__closure__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ messages.__class__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{% set x = messages.pop() %}",
])
def test_template_reaching_python_internals_fails_cleanly(template):
    with pytest.raises(UserError, match="sandbox forbids") as e:
        render_chat(template, MESSAGES)
    assert "\n" not in str(e.value)
    assert MESSAGES == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 'x' * 10**12 }}",
    "{{ ['x'] * 10**12 }}",
    "{{ 10 ** 10000000000 }}",
    "{% set ns = namespace(n=10**1000) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('x', 'xx') %}{% endfor %}",
    "{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}",
    "{{ 'x'|center(10**12) }}",
    "{{ 'x'.rjust(10**12) }}",
    "{{ '%01000000000000d' % 1 }}",
    "{{ '{:>1000000000000}'.format(1) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{{ 10.0 ** 1000 }}",
])
def test_template_that_would_run_away_is_bounded(template):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError, match="chat template") as e:
        render_chat(template, MESSAGES)
    assert "\n" not in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_ordinary_template_features_still_work():
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ m.role | upper }}:{{ m['content'] * 2 }}{{ '-' * 3 }}{% endfor %}{{ ns.n }}"
                "{{ messages | length }}{{ range(3) | list | join(',') }}{{ 2 ** 10 }}")
    assert render_chat(template, MESSAGES) == "USER:hihi---1" + "1" + "0,1,2" + "1024"


# --- seeds: tiny valid files of every kind ---------------------------------------------------------

def tiny_model(vocab: int, **overrides: Any) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"vocab_size": vocab, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8,
                              **overrides}))


def write_tiny_gguf(path: Path) -> Path:
    """A llama GGUF file as llama.cpp writes it: metadata, a byte-level vocabulary, F32, F16 and
    Q8_0 tensors (so every dequantiser path is fuzzed)."""
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he"] + SPECIALS
    cfg = ModelConfig.for_family("llama", vocab_size=len(tokens), block_size=16, n_layer=1, n_embd=32, n_head=2,
                                 n_kv_head=1, intermediate_size=64, tie_embeddings=True)
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    theirs = {ours: name for name, ours in GLOBAL_NAMES.items()}
    theirs.update({f"layers.0.{ours}": f"blk.0.{name}" for name, ours in LAYER_NAMES.items()})
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(16)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3] * len(SPECIALS))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied
        data = t.numpy()
        if name.endswith("up_proj.weight"):
            w.add_tensor(theirs[name], gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif name.endswith("gate_proj.weight"):
            w.add_tensor(theirs[name], data.astype(np.float16))
        else:
            w.add_tensor(theirs[name], data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Target:
    """One reader under fuzzing: the files it reads (name -> valid bytes, in ``folder``) and how
    to load them."""

    name: str
    folder: Path
    files: dict[str, bytes]
    load: Callable[[Path], object]

    def run(self, file: str, data: bytes) -> None:
        """Load with ``file`` replaced by ``data``; put the valid file back afterwards."""
        try:
            (self.folder / file).write_bytes(data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.load(self.folder)
        finally:
            (self.folder / file).write_bytes(self.files[file])


def _use_tokenizer(folder: Path, name: str) -> None:
    tok = load_tokenizer_file(folder / name)
    tok.decode(tok.encode("the fox <|im_end|> 😀", allowed_special="all"))


def build_targets(root: Path) -> dict[str, Target]:
    """Write every seed under ``root`` and return the fuzz targets by name."""
    char = CharTokenizer.train(TEXT, special_tokens=SPECIALS, unk=True)

    ckpt_dir = root / "checkpoint"
    ckpt.save_checkpoint(ckpt_dir, tiny_model(char.vocab_size), char)

    tok_dir = root / "tokenizers"
    tok_dir.mkdir()
    char.save(tok_dir / "char.json")
    bpe = BPETokenizer.train(TEXT, vocab_size=270, special_tokens=SPECIALS)
    bpe.save(tok_dir / "bpe.json")
    gguf_dir = root / "gguf"
    gguf_dir.mkdir()
    write_tiny_gguf(gguf_dir / "m.gguf")
    import_gguf(gguf_dir / "m.gguf").tokenizer.save(tok_dir / "hf.json")

    base_dir, lora_dir = root / "base", root / "lora"
    base = tiny_model(char.vocab_size)
    ckpt.save_checkpoint(base_dir, base, char)
    adapted = copy.deepcopy(base)
    add_lora(adapted, LoRAConfig(rank=2, targets=("q_proj", "v_proj", "down_proj")))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    save_adapter(lora_dir, adapted, LoRAConfig(rank=2, targets=("q_proj", "v_proj", "down_proj")), str(base_dir))

    def load_lora(folder: Path) -> None:
        apply_adapter(copy.deepcopy(base), load_adapter(folder))

    targets = {
        "checkpoint": Target("checkpoint", ckpt_dir, {}, load_checkpoint),
        "gguf": Target("gguf", gguf_dir, {}, lambda folder: import_gguf(folder / "m.gguf")),
        "tokenizer": Target("tokenizer", tok_dir, {}, lambda folder: None),
        "lora": Target("lora", lora_dir, {}, load_lora),
    }
    for t in targets.values():
        t.files = {f.name: f.read_bytes() for f in sorted(t.folder.iterdir()) if f.is_file()}
    tok = targets["tokenizer"]
    tok.load = lambda folder: [_use_tokenizer(folder, name) for name in tok.files]
    for t in targets.values():
        t.load(t.folder)  # every seed is valid
    return targets


# --- mutations ----------------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 7, 8, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]


def big_int(bits: int = 64) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([n for n in INTERESTING if n < 2**bits]), st.integers(0, 2**bits - 1))


@st.composite
def byte_damage(draw, data: bytes) -> bytes:
    """Truncation, overwritten bytes, or a chunk cut out or doubled."""
    kind = draw(st.sampled_from(["truncate", "flip", "cut", "repeat"]))
    n = len(data)
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            # Bias towards the header, where lengths and counts live.
            pos = draw(st.one_of(st.integers(0, min(n, 512) - 1), st.integers(0, n - 1)))
            out[pos] = draw(st.integers(0, 255))
        return bytes(out)
    start = draw(st.integers(0, n - 1))
    end = draw(st.integers(start, min(n, start + 64)))
    return data[:start] + data[end:] if kind == "cut" else data[:end] + data[start:]


JSON_LEAF = st.one_of(st.none(), st.booleans(), big_int(), st.integers(-2**70, 2**70).map(lambda x: -abs(x)),
                      st.floats(), st.text(max_size=8), st.sampled_from(["", "<|im_end|>", "Ġ", "x y", "F32"]))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_tree_damage(draw, tree: Any) -> Any:
    """Replace, delete or duplicate one node of a parsed JSON tree."""
    tree = copy.deepcopy(tree)
    path = draw(st.sampled_from(_paths(tree)))
    if not path:
        return draw(JSON_VALUE)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
    if action == "replace":
        parent[key] = draw(JSON_VALUE)
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    else:
        parent[draw(st.text(max_size=6))] = copy.deepcopy(parent[key])
    return tree


def json_damage(data: bytes) -> st.SearchStrategy[bytes]:
    tree = json.loads(data)
    return json_tree_damage(tree).map(lambda t: json.dumps(t).encode())


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
                      "F8_E4M3", "F8_E5M2", "C64", "F4", "X", ""]


@st.composite
def safetensors_damage(draw, data: bytes) -> bytes:
    """Damage the header of a safetensors file: one field of one tensor, or the length prefix."""
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "any", "prefix"]))
    if field == "prefix":
        return struct.pack("<Q", draw(big_int())) + data[8:]
    if field == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES))
    elif field == "shape":
        header[name]["shape"] = draw(st.lists(st.one_of(big_int(), st.integers(-3, 3)), max_size=4))
    elif field == "data_offsets":
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = draw(st.one_of(
            st.tuples(big_int(), big_int()).map(list),
            st.tuples(st.just(begin), st.integers(end, len(body) + 64)).map(list),
            st.tuples(st.integers(0, len(body)), st.integers(0, len(body))).map(list)))
    else:
        header = draw(json_tree_damage(header))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


# GGUF value types (gguf.GGUFValueType) and their sizes; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, role) of every count, length, type, dimension and offset field of a GGUF
    file, found by walking its header the way readers do."""
    fields: list[tuple[int, int, str]] = [(4, 4, "version"), (8, 8, "tensor count"), (16, 8, "kv count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(role: str) -> None:
        nonlocal pos
        fields.append((pos, 8, role))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            string("string length")
        elif vtype == 9:
            fields.append((pos, 4, "array type"))
            fields.append((pos + 4, 8, "array length"))
            item, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                value(item)
        else:
            pos += _GGUF_SIZES[vtype]

    for _ in range(n_kv):
        string("key length")
        fields.append((pos, 4, "value type"))
        pos += 4
        value(struct.unpack_from("<I", data, pos - 4)[0])
    for _ in range(n_tensors):
        string("tensor name length")
        fields.append((pos, 4, "n_dims"))
        n_dims = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        for _ in range(n_dims):
            fields.append((pos, 8, "dim"))
            pos += 8
        fields.append((pos, 4, "tensor type"))
        fields.append((pos + 4, 8, "tensor offset"))
        pos += 12
    return fields


def gguf_damage(data: bytes) -> st.SearchStrategy[bytes]:
    layout = gguf_layout(data)

    @st.composite
    def damage(draw) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 3))):
            pos, width, _role = draw(st.sampled_from(layout))
            old = int.from_bytes(data[pos:pos + width], "little")
            new = draw(st.one_of(big_int(8 * width), st.integers(max(0, old - 2), min(2**(8 * width) - 1, old + 2))))
            out[pos:pos + width] = new.to_bytes(width, "little")
        return bytes(out)

    return damage()


def damage_for(file: str, data: bytes) -> st.SearchStrategy[bytes]:
    """Every mutation that makes sense for ``file``."""
    kinds = [byte_damage(data)]
    if file.endswith(".json"):
        kinds.append(json_damage(data))
    elif file.endswith(".safetensors"):
        kinds.append(safetensors_damage(data))
    elif file.endswith(".gguf"):
        kinds.append(gguf_damage(data))
    return st.one_of(kinds)


def cases(target: Target) -> st.SearchStrategy[tuple[str, bytes]]:
    return st.sampled_from(sorted(target.files)).flatmap(
        lambda f: damage_for(f, target.files[f]).map(lambda data: (f, data)))


def check_case(target: Target, file: str, data: bytes) -> None:
    """The contract: success, or one UserError line."""
    try:
        target.run(file, data)
    except UserError as e:
        assert "\n" not in str(e), f"{target.name}/{file}: multi-line error {e}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- the fuzz tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Target]:
    return build_targets(tmp_path_factory.mktemp("seeds"))


# The same examples on every run by default, so a test run is reproducible; GPTLAB_FUZZ_RANDOM=1 draws new
# ones each time (to explore; benchmarks/fuzz_readers.py runs 10,000 cases).
FUZZ = settings(max_examples=int(os.environ.get("GPTLAB_FUZZ_EXAMPLES", "100")), deadline=None, database=None,
                suppress_health_check=list(HealthCheck), derandomize="GPTLAB_FUZZ_RANDOM" not in os.environ)
FUZZ_HEADROOM = 3 * 2**30  # address space a fuzzing process may take beyond what the valid seeds needed


def cap_address_space(headroom: int) -> int:
    """Cap this process's address space (RLIMIT_AS) at its current size plus ``headroom`` bytes: a
    file that makes a reader allocate without bound then fails with MemoryError (or aborts the
    process, for an allocation in Rust) instead of exhausting the machine. Returns the cap."""
    vm_kib = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize")))
    limit = vm_kib * 1024 + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


_CHILD_TARGETS: dict[str, Target] = {}


def fuzz_reader(name: str, root: str, last_case: str) -> float:
    """In the fuzzing process: run FUZZ on reader ``name`` (seeds written under ``root`` on the
    first call, then the address space capped), writing each case to ``last_case`` before trying it.
    Returns how much the peak RSS grew, in MiB."""
    if not _CHILD_TARGETS:
        _CHILD_TARGETS.update(build_targets(Path(root)))
        cap_address_space(FUZZ_HEADROOM)
    target = _CHILD_TARGETS[name]
    before = peak_rss_mib()

    @FUZZ
    @given(case=cases(target))
    def fuzz(case: tuple[str, bytes]) -> None:
        Path(last_case).write_bytes(pickle.dumps(case))
        check_case(target, *case)

    fuzz()
    return peak_rss_mib() - before


class FuzzingProcess:
    """One fresh process (spawned, so nothing of this one's threads or memory) that runs the fuzz
    tests under a capped address space, with its seeds under ``root``; started again if a case
    kills it."""

    def __init__(self, root: Path):
        self.root = root
        self.start()

    def start(self) -> None:
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def fuzz(self, name: str, last_case: Path) -> float:
        return self.pool.submit(fuzz_reader, name, str(self.root), str(last_case)).result()


@pytest.fixture(scope="module")
def fuzzing_process(tmp_path_factory):
    process = FuzzingProcess(tmp_path_factory.mktemp("fuzz-seeds"))
    yield process
    process.pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", ["checkpoint", "gguf", "tokenizer", "lora"])
def test_damaged_files_load_or_fail_in_one_line(fuzzing_process, tmp_path, name):
    """Every case loads or ends in one UserError line, and memory stays bounded: declared sizes of
    terabytes must be refused before anything is allocated. The cases run in a separate process
    with a capped address space, so a runaway allocation fails this test with the case that
    caused it instead of taking the test run (and the machine) down."""
    last = tmp_path / "last-case.pkl"
    try:
        growth = fuzzing_process.fuzz(name, last)
    except BrokenProcessPool:
        fuzzing_process.start()
        file, data = pickle.loads(last.read_bytes())
        pytest.fail(f"the {name} reader killed the fuzzing process (out of memory, a crash in native code, or an "
                    f"error that cannot be sent back) on a damaged {file}, saved in {last}: {data[:200]!r}")
    assert growth < 300, f"peak RSS grew by {growth:.0f} MiB"


@pytest.mark.parametrize("file, patch, message", [
    ("model.safetensors", lambda h: h["embed_tokens.weight"].update(shape=[2**40, 2**20]), "cannot be read"),
    ("config.json", lambda c: c.update(n_embd=2**20, n_layer=2**10, n_head=1), "does not fit the model"),
    ("config.json", lambda c: c.update(vocab_size=2**40), "does not fit the model"),
    ("config.json", lambda c: c.update(n_embd=2**31), "too large to exist"),  # 2^62 elements overflow
])
def test_huge_declared_sizes_are_refused_before_allocation(targets, file, patch, message):
    target = targets["checkpoint"]
    data = target.files[file]
    if file.endswith(".json"):
        tree = json.loads(data)
        patch(tree)
        data = json.dumps(tree).encode()
    else:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        patch(header)
        text = json.dumps(header).encode()
        data = struct.pack("<Q", len(text)) + text + data[8 + n:]
    before = peak_rss_mib()
    with pytest.raises(UserError, match=message):
        target.run(file, data)
    assert peak_rss_mib() - before < 100


@pytest.mark.parametrize("file, patch, message", [
    ("bpe.json", lambda d: d["special_tokens"].update({"<|im_end|>": 2**40}), "special token"),
    ("bpe.json", lambda d: d["merges"].append("q z"), "merge"),
    ("char.json", lambda d: d.update(chars=["ab", 3]), "char"),
    ("hf.json", lambda d: d["added_tokens"][0].update(id=2**40), "tokenizer"),
    ("hf.json", lambda d: d["model"]["merges"].append(["qq", "zz"]), "tokenizer"),
])
def test_bad_tokenizer_files_name_the_problem(targets, file, patch, message):
    target = targets["tokenizer"]
    tree = json.loads(target.files[file])
    patch(tree)
    before = peak_rss_mib()
    with pytest.raises(UserError, match=message) as e:
        target.run(file, json.dumps(tree).encode())
    assert file in str(e.value) and "\n" not in str(e.value)
    assert peak_rss_mib() - before < 100


# Files the Rust libraries accept and then panic on (pyo3's PanicException is a BaseException),
# both found by the fuzz test above: tiktoken's encoder on a pattern that matches the empty string,
# and the tokenizers library's BPE builder on a subword prefix longer than a merged token.
@pytest.mark.parametrize("file, patch", [
    ("bpe.json", lambda d: d.update(pattern="(?=t)")),
    ("hf.json", lambda d: d["model"].update(continuing_subword_prefix="¦%!𗣏d\x9fLõ")),
])
def test_files_that_make_the_rust_tokenizers_panic_end_in_one_line(targets, file, patch):
    tree = json.loads(targets["tokenizer"].files[file])
    patch(tree)
    with pytest.raises(UserError, match="damaged") as e:
        targets["tokenizer"].run(file, json.dumps(tree).encode())
    assert "\n" not in str(e.value)


# Found by benchmarks/fuzz_readers.py: a rank of 2^62 reached torch.empty before any check, and a key
# holding a line break made a two-line message.
@pytest.mark.parametrize("patch, message", [
    (lambda c: c.update(rank=2**62), "not rank"),
    (lambda c: c.update({"ra\nnk": 2}), "LoRA config: unknown key"),
])
def test_damaged_adapter_configs_end_in_one_line_before_allocation(targets, patch, message):
    target = targets["lora"]
    tree = json.loads(target.files["adapter_config.json"])
    patch(tree)
    before = peak_rss_mib()
    with pytest.raises(UserError, match=message) as e:
        target.run("adapter_config.json", json.dumps(tree).encode())
    assert "\n" not in str(e.value) and peak_rss_mib() - before < 100


@pytest.mark.parametrize("role, value", [("array length", 2**62), ("string length", 2**63), ("dim", 2**40),
                                         ("tensor offset", 2**60), ("tensor count", 2**40), ("kv count", 2**40),
                                         ("n_dims", 2**31)])
def test_gguf_huge_counts_are_refused(targets, role, value):
    target = targets["gguf"]
    data = bytearray(target.files["m.gguf"])
    pos, width, _ = next(f for f in gguf_layout(bytes(data)) if f[2] == role)
    data[pos:pos + width] = value.to_bytes(width, "little")
    before = peak_rss_mib()
    with pytest.raises(UserError, match="m.gguf"):
        target.run("m.gguf", bytes(data))
    assert peak_rss_mib() - before < 100

