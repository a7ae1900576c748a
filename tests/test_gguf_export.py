"""GGUF export: every family round-trips through gptlab's own GGUF import (exactly at f32, within
rounding at f16 and q8_0) and loads in transformers' GGUF reader with equal logits and ids; what
llama.cpp cannot compute is refused in one line."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gptlab.cli import main  # noqa: E402
from gptlab.errors import UserError  # noqa: E402
from gptlab.model.config import ModelConfig  # noqa: E402
from gptlab.model.transformer import GPT  # noqa: E402
from gptlab.tokenizers import BPETokenizer, CharTokenizer, HFTokenizer, SentencePieceTokenizer  # noqa: E402
from gptlab.tokenizers.bpe import GPT4_PATTERN  # noqa: E402
from gptlab.weights.checkpoint import Checkpoint, save_checkpoint  # noqa: E402
from gptlab.weights.gguf import import_gguf, read_gguf, unpermute_qk  # noqa: E402
from gptlab.weights.gguf_export import export_gguf, permute_qk, pre_tokenizer_name  # noqa: E402
from gptlab.weights.load import load_checkpoint  # noqa: E402

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog; café {i * 7} 😀!\n" for i in range(300))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Per storage type, the largest |logit difference| allowed after the round trip. f32 copies every
# weight, so logits agree to float32 summation (measured: 0); f16 rounds each weight by 2^-11 of
# itself and q8_0 by up to 1/254 of its block's largest value (measured on these models: 2e-4 and
# 6e-3), with about 3x room.
TOLERANCE = {"f32": 1e-5, "f16": 1e-3, "q8_0": 2e-2, "q4_1": 0.3}
FAMILIES = {  # name -> (family, options); every one tiny, with 2 layers
    "gpt2": ("gpt2", {"block_size": 1024}),  # transformers' GPT-2 reads GGUF with 1024 positions only
    "gpt2-untied-no-bias": ("gpt2", {"tie_embeddings": False, "bias": False}),
    "llama-gqa": ("llama", {"n_kv_head": 2}),
    "llama-mqa-tied": ("llama", {"n_kv_head": 1, "tie_embeddings": True}),
    "llama-linear-rope": ("llama", {"n_kv_head": 2, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("qwen2", {"n_kv_head": 2}),
    "mistral-window": ("mistral", {"n_kv_head": 2, "sliding_window": 32}),
    # Heads wider than n_embd / n_head, written as attention.key_length.
    "llama-wide-heads": ("llama", {"n_kv_head": 2, "head_dim": 32}),
}
# Gemma 3, with a SentencePiece vocabulary (GEMMA_FAMILIES' tests): 7 layers, so local (0-4, 6) and
# global (5) ones, a window shorter than the sequences, one k/v head, heads of 256 (transformers'
# GGUF reader takes query_pre_attn_scalar as 256 where llama.cpp takes the head width), a
# linear-scaled global RoPE, and a final soft-cap (both in newer llama.cpp's gemma3).
GEMMA_FAMILIES = {
    "gemma3": ("gemma3", {"n_layer": 7, "n_head": 2, "n_kv_head": 1, "head_dim": 256, "sliding_window": 8}),
    "gemma3-scaled-softcap": ("gemma3", {"n_layer": 7, "n_kv_head": 2, "sliding_window": 8,
                                         "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                         "final_logit_softcapping": 5.0, "tie_embeddings": False}),
}
# Gemma's special tokens, at Gemma's ids
GEMMA_SPECIALS = {"pad_id": 0, "pad_piece": "<pad>", "eos_id": 1, "eos_piece": "<eos>", "bos_id": 2,
                  "bos_piece": "<bos>", "unk_id": 3, "unk_piece": "<unk>"}
GEMMA_CHAT = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "add_bos_token": True}


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXT, vocab_size=320, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A SentencePiece tokenizer.model trained here as Gemma's was: byte fallback, no leading "▁",
    Gemma's special tokens and turn markers, and a user-defined run of spaces (which GGUF
    spells with real spaces)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines()), model_writer=out, model_type="bpe", vocab_size=360,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        control_symbols=["<start_of_turn>", "<end_of_turn>"], user_defined_symbols=["▁▁▁▁"], minloglevel=2,
        **GEMMA_SPECIALS)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


@pytest.fixture(scope="module")
def sp(sp_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.from_model_file(sp_model)


def gemma_checkpoint(tmp_path: Path, kind: str, tokenizer: SentencePieceTokenizer) -> Checkpoint:
    """A tiny Gemma 3 checkpoint with Gemma's tokenizer settings (its BOS read before every text)."""
    ckpt = checkpoint(tmp_path, kind, tokenizer, vocab_size=tokenizer.vocab_size + 3)  # padded: [PADn]
    (Path(ckpt.path) / "tokenizer_config.json").write_text(json.dumps(GEMMA_CHAT))
    return load_checkpoint(ckpt.path)


def tiny_model(kind: str, vocab_size: int) -> GPT:
    family, options = {**FAMILIES, **GEMMA_FAMILIES}[kind]
    torch.manual_seed(0)
    cfg = ModelConfig.for_family(family, **{"vocab_size": vocab_size, "block_size": 64, "n_layer": 2, "n_head": 4,
                                            "n_embd": 64, **options})
    model = GPT(cfg).eval()
    with torch.no_grad():  # biases and norm weights start at 0 and 1: make them tell apart
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def checkpoint(tmp_path: Path, kind: str, tokenizer, vocab_size: int | None = None) -> Checkpoint:
    model = tiny_model(kind, vocab_size or tokenizer.vocab_size)
    save_checkpoint(tmp_path / kind, model, tokenizer)
    return load_checkpoint(tmp_path / kind)


def max_logit_diff(a: torch.nn.Module, b, vocab: int, length: int = 48) -> float:
    x = torch.randint(vocab, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = b(x)
        theirs = theirs.logits if hasattr(theirs, "logits") else theirs[0]
        return (a.eval()(x)[0] - theirs).abs().max().item()


def one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_permute_is_the_inverse_of_the_import_and_of_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(6 * 16, 40)
    for n_head in (6, 3):
        permuted = permute_qk(w, n_head)
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_qk(permuted, n_head), w)
        reverse = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), n_head, n_head)
        assert np.array_equal(reverse, w.numpy())


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_round_trip_through_gptlabs_import_is_exact_at_f32(tmp_path, bpe, kind):
    ckpt = checkpoint(tmp_path, kind, bpe, vocab_size=bpe.vocab_size + 5)  # a padded embedding: [PADn] tokens
    export_gguf(ckpt, tmp_path / "m.gguf")
    back = import_gguf(tmp_path / "m.gguf")
    ours = ckpt.model.state_dict()
    assert back.model.state_dict().keys() >= ours.keys()
    for name, t in back.model.state_dict().items():
        if name in ours:
            assert torch.equal(t, ours[name]), name
        else:  # a bias the architecture stores but the model lacks is written as zeros
            assert name.endswith(".bias") and not t.any(), name
    cfg, got = ckpt.config, back.config
    assert (got.arch, got.vocab_size, got.kv_heads, got.tie_embeddings, got.rope_scaling) == (
        "llama" if cfg.arch == "mistral" else cfg.arch, cfg.vocab_size, cfg.kv_heads, cfg.tie_embeddings,
        cfg.rope_scaling)
    # Mistral's window is the file's context (llama.cpp's llama has no window): equal within it.
    assert got.block_size == min(cfg.block_size, cfg.sliding_window or cfg.block_size)
    assert max_logit_diff(back.model, ckpt.model, bpe.vocab_size, min(48, got.block_size)) <= TOLERANCE["f32"]
    text = TEXT[:3000] + " naïve 東京 \t\n  spaces  "
    assert back.tokenizer.encode(text) == bpe.encode(text)
    assert back.tokenizer.encode("<|im_end|>", allowed_special="all") == [bpe.token_id("<|im_end|>")]


@pytest.mark.parametrize("storage", ["f16", "q8_0", "q4_1"])
@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "qwen2"])
def test_rounded_storage_stays_close_and_is_smaller(tmp_path, bpe, kind, storage):
    ckpt = checkpoint(tmp_path, kind, bpe)
    export_gguf(ckpt, tmp_path / "f32.gguf")
    export_gguf(ckpt, tmp_path / "small.gguf", storage)
    reader, meta = read_gguf(tmp_path / "small.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == storage.upper() and types["output_norm.weight"] == "F32"
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7, "q4_1": 3}[storage]
    ratio = (tmp_path / "small.gguf").stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    assert ratio < {"f16": 0.6, "q8_0": 0.35, "q4_1": 0.25}[storage]
    diff = max_logit_diff(import_gguf(tmp_path / "small.gguf").model, ckpt.model, bpe.vocab_size)
    assert 0 < diff <= TOLERANCE[storage]


def test_metadata_uses_llamacpps_keys(tmp_path, bpe):
    ckpt = checkpoint(tmp_path, "llama-gqa", bpe)
    (Path(ckpt.path) / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    export_gguf(load_checkpoint(ckpt.path), tmp_path / "m.gguf")
    reader, meta = read_gguf(tmp_path / "m.gguf")
    cfg = ckpt.config
    expected = {"general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 64,
                "llama.block_count": 2, "llama.feed_forward_length": cfg.mlp_hidden, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16, "llama.vocab_size": bpe.vocab_size,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.bos_token_id": bpe.token_id("<|im_start|>"),
                "tokenizer.ggml.eos_token_id": bpe.token_id("<|im_end|>"), "tokenizer.ggml.add_bos_token": False}
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == cfg.rope_theta
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.token_type"][bpe.token_id("<|im_end|>")] == 3  # control
    assert len(meta["tokenizer.ggml.merges"]) == len(bpe.merges)
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output.weight", "blk.1.attn_q.weight",
                                                "blk.1.ffn_gate.weight"}


@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa", "llama-mqa-tied", "qwen2", "mistral-window",
                                  "llama-wide-heads"])
def test_transformers_reads_the_export_with_equal_logits_and_ids(tmp_path, bpe, kind):
    """``from_pretrained(..., gguf_file=)`` needs accelerate, which is not installed here; the
    reader it calls, ``load_gguf_checkpoint``, does not, so the model is filled with that."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ckpt = checkpoint(tmp_path, kind, bpe)
    export_gguf(ckpt, tmp_path / "m.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
        ref = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        tensors = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=ref)["tensors"]
        loaded = ref.load_state_dict(tensors, strict=False)
        ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert loaded.unexpected_keys == [] and loaded.missing_keys == (["lm_head.weight"] if ckpt.config.tie_embeddings
                                                                    else [])
    assert type(ref).__name__ == {"gpt2": "GPT2LMHeadModel", "qwen2": "Qwen2ForCausalLM"}.get(
        ckpt.config.arch, "LlamaForCausalLM")
    assert max_logit_diff(ckpt.model, ref, bpe.vocab_size, 32) <= 1e-5
    text = TEXT[:2000] + " naïve 東京 \t\n  spaces  "
    assert ref_tok(text, add_special_tokens=False).input_ids == bpe.encode(text)


def test_imported_hf_tokenizers_keep_their_pre_tokenizer(tmp_path, bpe):
    """A Hugging Face tokenizer.json keeps its llama.cpp pre-tokenizer: SmolLM's digits-first split."""
    from tokenizers import Tokenizer, pre_tokenizers

    from gptlab.tokenizers import to_hf_json

    hf = Tokenizer.from_str(json.dumps(to_hf_json(bpe)))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    smollm = HFTokenizer(json.loads(hf.to_str()))
    assert pre_tokenizer_name(smollm.hf_json["pre_tokenizer"]) == "smollm"
    ckpt = checkpoint(tmp_path, "llama-gqa", smollm)
    export_gguf(ckpt, tmp_path / "m.gguf")
    back = import_gguf(tmp_path / "m.gguf")
    assert read_gguf(tmp_path / "m.gguf")[1]["tokenizer.ggml.pre"] == "smollm"
    text = TEXT[:2000] + " 12345 ½ 3.14"
    assert back.tokenizer.encode(text) == smollm.encode(text) != bpe.encode(text)
    # and an exported-then-imported tokenizer exports to the same vocabulary again
    export_gguf(back, tmp_path / "again.gguf")
    first, second = read_gguf(tmp_path / "m.gguf")[1], read_gguf(tmp_path / "again.gguf")[1]
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert first[key] == second[key], key


GEMMA_TEXT = ("Hello  world,\tnaïve café 東京 😀 12345\n\n    four spaces,  two; <end_of_turn> "
              + TEXT[:1500] + "\n  end  ")


@pytest.mark.parametrize("kind", list(GEMMA_FAMILIES))
def test_gemma3_import_export_import_is_exact_at_f32(tmp_path, sp, kind):
    """Gemma's norms are written as 1 + weight, as llama.cpp's converter writes them, and read
    back less 1: a gptlab model comes back within float32 rounding of that sum (logits within
    1e-5), and an imported model exports and imports again exactly, bit for bit."""
    ckpt = gemma_checkpoint(tmp_path, kind, sp)
    export_gguf(ckpt, tmp_path / "m.gguf")
    first = import_gguf(tmp_path / "m.gguf")
    export_gguf(first, tmp_path / "again.gguf")
    second = import_gguf(tmp_path / "again.gguf")
    ours, a, b = (c.model.state_dict() for c in (ckpt, first, second))
    assert ours.keys() == a.keys() == b.keys()
    for name, t in ours.items():
        assert torch.equal(a[name], b[name]), name
        assert torch.allclose(a[name], t, rtol=0, atol=1e-7) if name.endswith("norm.weight") else torch.equal(
            a[name], t), name
    assert first.config == second.config
    fields = ("arch", "vocab_size", "block_size", "n_layer", "n_head", "kv_heads", "head_dim", "sliding_window",
              "layer_pattern", "rope_theta", "rope_local_theta", "rope_scaling", "final_logit_softcapping",
              "tie_embeddings", "mlp_hidden")
    assert [getattr(first.config, f) for f in fields] == [getattr(ckpt.config, f) for f in fields]
    assert first.config.query_pre_attn_scalar == ckpt.config.head_dim  # llama.cpp's, for a model of 7 layers
    assert max_logit_diff(first.model, ckpt.model, sp.vocab_size, 48) <= TOLERANCE["f32"]
    assert max_logit_diff(second.model, first.model, sp.vocab_size, 48) == 0
    ids = sp.encode(GEMMA_TEXT, allowed_special="all")
    assert second.tokenizer.encode(GEMMA_TEXT, allowed_special="all") == ids
    assert sp.token_id("<end_of_turn>") in ids and sp.user_defined["▁▁▁▁"] in ids
    assert second.tokenizer.decode(ids) == GEMMA_TEXT
    assert {k: second.tokenizer_config[k] for k in GEMMA_CHAT} == GEMMA_CHAT


def test_gemma3_file_is_written_as_llamacpps_converter_writes_it(tmp_path, sp):
    ckpt = gemma_checkpoint(tmp_path, "gemma3", sp)
    export_gguf(ckpt, tmp_path / "m.gguf")
    reader, meta = read_gguf(tmp_path / "m.gguf")
    expected = {"general.architecture": "gemma3", "gemma3.block_count": 7, "gemma3.embedding_length": 64,
                "gemma3.attention.head_count": 2, "gemma3.attention.head_count_kv": 1,
                "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
                "gemma3.attention.sliding_window": 8, "gemma3.context_length": 64, "gemma3.rope.freq_base": 1e6,
                "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
                "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.unknown_token_id": 3}
    assert {k: meta[k] for k in expected} == expected
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(meta["tokenizer.ggml.scores"]) == ckpt.config.vocab_size == sp.vocab_size + 3
    spaces = sp.user_defined["▁▁▁▁"]
    assert tokens[spaces] == "    " and types[spaces] == 4  # user-defined, spelled with spaces
    assert tokens[-1] == f"[PAD{sp.vocab_size + 2}]" and types[-1] == 5
    assert types[sp.token_id("<end_of_turn>")] == 3 and types.count(6) == 256  # control; byte pieces
    stored = {t.name: t.data for t in reader.tensors}
    assert "output.weight" not in stored  # tied, as Gemma's head always is
    state = ckpt.model.state_dict()
    for gguf_name, ours in (("output_norm.weight", "norm.weight"),
                            ("blk.5.attn_q_norm.weight", "layers.5.self_attn.q_norm.weight"),
                            ("blk.5.post_ffw_norm.weight", "layers.5.post_feedforward_layernorm.weight")):
        assert np.array_equal(stored[gguf_name], (state[ours] + 1).numpy()), gguf_name


def test_transformers_reads_the_gemma3_export_with_equal_logits_and_ids(tmp_path, sp):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ckpt = gemma_checkpoint(tmp_path, "gemma3", sp)
    export_gguf(ckpt, tmp_path / "m.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf")
        config._attn_implementation = "eager"
        ref = transformers.Gemma3ForCausalLM(config).float().eval()
        tensors = load_gguf_checkpoint(str(tmp_path / "m.gguf"), return_tensors=True, model_to_load=ref)["tensors"]
        loaded = ref.load_state_dict(tensors, strict=False)
        ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert loaded.unexpected_keys == [] and loaded.missing_keys == ["lm_head.weight"]
    assert (config.sliding_window, config.head_dim, config.layer_types[4:6]) == (8, 256, ["sliding_attention",
                                                                                          "full_attention"])
    assert max_logit_diff(ckpt.model, ref, sp.vocab_size, 48) <= 1e-5
    text = GEMMA_TEXT.replace("    ", " ")  # transformers respells user-defined runs of spaces (test_sentencepiece)
    assert ref_tok(text, add_special_tokens=False).input_ids == sp.encode(text, allowed_special="all")


def test_an_imported_gemma3_gguf_exports_as_a_folder_transformers_loads(tmp_path, sp):
    """The path of ``gptlab export gemma3-270m --format hf``: GGUF import fills in the options
    llama.cpp fixes (query_pre_attn_scalar among them), and the folder written from it must pass
    transformers' type-checked config and give our logits."""
    ckpt = gemma_checkpoint(tmp_path, "gemma3", sp)
    export_gguf(ckpt, tmp_path / "m.gguf")
    assert main(["export", str(tmp_path / "m.gguf"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["query_pre_attn_scalar"] == 256 and isinstance(config["query_pre_attn_scalar"], int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert max_logit_diff(import_gguf(tmp_path / "m.gguf").model, ref.float().eval(), sp.vocab_size, 48) <= 1e-5


def test_a_hugging_face_folder_with_only_a_tokenizer_model_keeps_it(tmp_path, sp, sp_model):
    """Gemma's and Llama 2's own layout: a SentencePiece tokenizer.model and no tokenizer.json."""
    from gptlab.weights.checkpoint import MissingTokenizer
    from gptlab.weights.hf import export_hf

    model = tiny_model("gemma3", sp.vocab_size)
    export_hf(Checkpoint(tmp_path, model, model.config, MissingTokenizer(tmp_path, sp.vocab_size)), tmp_path / "hf",
              family="gemma3_text")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(sp_model.read_bytes())
    ckpt = load_checkpoint(tmp_path / "hf")
    assert isinstance(ckpt.tokenizer, SentencePieceTokenizer)
    export_gguf(ckpt, tmp_path / "m.gguf")
    back = import_gguf(tmp_path / "m.gguf")
    ids = sp.encode(GEMMA_TEXT, allowed_special="all")
    assert ckpt.tokenizer.encode(GEMMA_TEXT, allowed_special="all") == back.tokenizer.encode(
        GEMMA_TEXT, allowed_special="all") == ids
    assert max_logit_diff(back.model, model, sp.vocab_size) <= TOLERANCE["f32"]


@pytest.mark.parametrize("options,named", [
    ({"layer_pattern": "LG"}, "layer_pattern='LG'"),
    ({"rope_local_theta": 5000.0}, "local RoPE base of 5000"),
    ({"query_pre_attn_scalar": 24.0}, "query_pre_attn_scalar=24.0"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
])
def test_gemma3_options_llamacpp_fixes_otherwise_are_refused(tmp_path, sp, options, named):
    cfg = ModelConfig.for_family("gemma3", vocab_size=sp.vocab_size, block_size=64, n_layer=6, n_head=4, n_embd=64,
                                 **options)
    message = one_line_error("does not compute", export_gguf, Checkpoint(tmp_path, GPT(cfg), cfg, sp),
                             tmp_path / "m.gguf")
    assert named in message and "gemma3" in message
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("options,named", [
    ({"mlp": "relu2"}, "mlp='relu2'"),
    ({"qk_norm": True}, "qk_norm=True"),
    ({"pos_embedding": "alibi"}, "pos_embedding='alibi'"),
    ({"pos_embedding": "sinusoidal"}, "pos_embedding='sinusoidal'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}}, "'yarn'"),
])
def test_options_llamacpp_does_not_compute_are_refused(tmp_path, bpe, options, named):
    family = "gpt2" if options.get("pos_embedding") in ("alibi", "sinusoidal") else "llama"
    cfg = ModelConfig.for_family(family, vocab_size=bpe.vocab_size, block_size=64, n_layer=1, n_head=4, n_embd=64,
                                 **options)
    ckpt = Checkpoint(tmp_path, GPT(cfg), cfg, bpe)
    message = one_line_error("does not compute", export_gguf, ckpt, tmp_path / "m.gguf")
    assert named in message
    assert not (tmp_path / "m.gguf").exists()


def test_tokenizers_without_a_faithful_gguf_form_are_refused(tmp_path, bpe):
    chars = CharTokenizer.train(TEXT, special_tokens=["<|endoftext|>"])
    cfg = ModelConfig.for_family("llama", vocab_size=400, block_size=64, n_layer=1, n_head=4, n_embd=64)
    model = GPT(cfg)
    one_line_error("character-level tokenizer has no GGUF form", export_gguf,
                   Checkpoint(tmp_path, model, cfg, chars), tmp_path / "m.gguf")
    gpt4 = BPETokenizer.train(TEXT, vocab_size=300, pattern=GPT4_PATTERN)
    message = one_line_error("pre-tokenizer that none of llama.cpp's", export_gguf,
                             Checkpoint(tmp_path, model, cfg, gpt4), tmp_path / "m.gguf")
    assert "smollm" in message
    small = ModelConfig.for_family("llama", vocab_size=100, block_size=64, n_layer=1, n_head=4, n_embd=64)
    one_line_error("do not belong together", export_gguf, Checkpoint(tmp_path, GPT(small), small, bpe),
                   tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_types_and_overwrite(tmp_path, bpe, capsys):
    ckpt = checkpoint(tmp_path, "llama-gqa", bpe)
    out = tmp_path / "m.gguf"
    argv = ["export", str(ckpt.path), "--format", "gguf", "--out", str(out), "--type", "q8_0"]
    assert main(argv) == 0
    assert "GGUF, q8_0" in capsys.readouterr().out
    for args, fragments in ((argv, ("already exists", "--force")),
                            ([*argv[:-1], "q4_k", "--force"], ("--type 'q4_k'", "f32, f16, q8_0")),
                            ([*argv[:5], str(tmp_path / "m.bin")], ("must end in .gguf",)),
                            (["export", str(ckpt.path), "--out", str(tmp_path / "hf"), "--type", "f16"], ("--type",))):
        assert main(args) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert all(f in err for f in fragments), err
    assert main([*argv[:-1], "f16", "--force"]) == 0
    assert read_gguf(out)[1]["general.file_type"] == 1
    # a GGUF export is itself a MODEL: sample from it
    assert main(["sample", str(out), "--prompt", "Line 1", "--max-new-tokens", "3", "--greedy"]) == 0
