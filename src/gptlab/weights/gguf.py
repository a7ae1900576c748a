"""GGUF files (llama.cpp's format) in: weights, config and tokenizer from one file.

A GGUF file holds everything a model needs: metadata (hyper-parameters under
``{architecture}.*``, the tokenizer under ``tokenizer.*``) and tensors, each stored in its own
type (float, or a block-quantised type such as Q4_1 or Q8_0). Importing it is
- dequantising every tensor to float32 (``gguf.quants.dequantize``);
- renaming llama.cpp's tensors to gptlab's (one table per architecture in ``ARCHITECTURES``:
  data, as in ``weights/hf.py``, which ``weights/gguf_export.py`` reads the other way), cutting
  GPT-2's fused ``attn_qkv`` into q, k and v;
- undoing the row permutation that llama.cpp's converter applies to Llama's q and k weights
  (``unpermute_qk``), and the 1 it adds to Gemma's norm weights (``Arch.norm_shift``);
- reading the ``ModelConfig`` from the metadata, with what llama.cpp fixes for an architecture
  rather than stores (Gemma 3's layer pattern, local RoPE base and attention scale), and the
  tokenizer: byte-level BPE as a Hugging Face ``tokenizer.json``, or a SentencePiece vocabulary
  (``tokenizers/sentencepiece.py``).

GGUF writes a tensor's shape fastest-varying dimension first (ggml's ``ne``); numpy and torch
write it slowest first, so every shape read from the file is reversed.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from gptlab.errors import UserError, names
from gptlab.model.config import FAMILY_DEFAULTS, ModelConfig
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.bpe import bytes_to_unicode, render_token
from gptlab.tokenizers.hf import HFTokenizer
from gptlab.tokenizers.sentencepiece import SPACE, SentencePieceTokenizer
from gptlab.weights import build_checked
from gptlab.weights.checkpoint import CHAT_CONFIG, Checkpoint, save_checkpoint
from gptlab.weights.hf import DTYPES


GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",  # absent when the head is tied to the embedding
}
# Tensors of block N are "blk.N.<key>" in GGUF and "layers.N.<value>" in gptlab.
_LLAMA_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Qwen2 is Llama plus biases on q, k and v.
LAYER_NAMES = {
    **_LLAMA_LAYER_NAMES,
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
# Gemma 3: Llama's names with a norm on each side of the attention and of the MLP (a sandwich:
# post_attention_norm is on the attention's output, ffn_norm is the MLP's input) and the QK-norms.
_GEMMA3_LAYER_NAMES = {
    **_LLAMA_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
GPT2_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "position_embd.weight": "embed_positions.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "lm_head.weight",
}
# A tuple names gptlab tensors that GGUF stores as one, stacked along rows: GPT-2's fused q, k, v.
GPT2_LAYER_NAMES: dict[str, str | tuple[str, ...]] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "attn_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.bias": "post_attention_layernorm.bias",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_down.bias": "mlp.down_proj.bias",
}


@dataclass(frozen=True)
class Arch:
    """One llama.cpp architecture: which gptlab family it is and how its tensors are named.
    Import reads these tables one way and ``weights/gguf_export.py`` writes them the other."""

    family: str
    """gptlab's family (``FAMILY_DEFAULTS``) the architecture is."""
    permute_qk: bool
    """Whether llama.cpp's converter permuted the q and k rows (it does for Llama only)."""
    global_names: dict[str, str]
    """GGUF name -> gptlab name of the tensors outside the blocks."""
    layer_names: dict[str, str | tuple[str, ...]]
    """GGUF name -> gptlab name(s) of the tensors of every block ("blk.N." / "layers.N." omitted)."""
    norm_eps_key: str = "attention.layer_norm_rms_epsilon"
    """The metadata key (after "{architecture}.") of the norms' epsilon."""
    norm_shift: float = 0.0
    """What llama.cpp's converter adds to every norm weight: 1 for Gemma, whose norms scale by
    1 + weight, so that the file holds the scale itself (import subtracts it, export adds it)."""


ARCHITECTURES = {
    "llama": Arch("llama", True, GLOBAL_NAMES, _LLAMA_LAYER_NAMES),
    "qwen2": Arch("qwen2", False, GLOBAL_NAMES, LAYER_NAMES),
    "gpt2": Arch("gpt2", False, GPT2_GLOBAL_NAMES, GPT2_LAYER_NAMES, "attention.layer_norm_epsilon"),
    "gemma3": Arch("gemma3", False, GLOBAL_NAMES, _GEMMA3_LAYER_NAMES, norm_shift=1.0),
}


def norm_shift(arch: Arch, name: str) -> float:
    """What the file adds to tensor ``name`` (a GGUF or a gptlab name; both end in "norm.weight"
    for a norm): ``arch.norm_shift`` for a norm's weight, else 0."""
    return arch.norm_shift if name.endswith("norm.weight") else 0.0


def layer_tensor_names(ours: str | tuple[str, ...], layer: str) -> tuple[str, ...]:
    """The gptlab names of one ``layer_names`` entry in block ``layer``."""
    return tuple(f"layers.{layer}.{o}" for o in ((ours,) if isinstance(ours, str) else ours))


# How each pre-tokenizer named by ``tokenizer.ggml.pre`` cuts text before BPE, as in llama.cpp's
# llama-vocab.cpp: regexes applied in turn (each match kept as its own piece), and whether
# GPT-2's own regex runs after them. Names not listed get GPT-2's regex alone.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    # GPT-2's own regex; llama.cpp spells it "gpt-2" (and refuses "gpt2"). Some files say "gpt2".
    "gpt-2": ((), True),
    "gpt2": ((), True),
    "default": ((), True),
    # SmolLM's vocabulary was trained on single digits (its tokenizer.json has Digits first).
    "smollm": ((r"\p{N}",), True),
    "llama-bpe": ((_LLAMA3_SPLIT,), False),
    "llama3": ((_LLAMA3_SPLIT,), False),
    "qwen2": ((_QWEN2_SPLIT,), False),
}
# llama.cpp's token types (tokenizer.ggml.token_type).
CONTROL, USER_DEFINED = 3, 4


@dataclass
class GGUFCheckpoint(Checkpoint):
    """A ``Checkpoint`` plus what a GGUF file says about chat use: a Hugging Face
    ``tokenizer_config.json`` dict (``chat_template``, ``bos_token``, ``eos_token``, ...)."""

    tokenizer_config: dict[str, Any] = field(default_factory=dict)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation; ``n_head`` is the number of heads ``w`` holds.

    llama.cpp rotates interleaved pairs (dims 2j, 2j+1) while Hugging Face rotates halves
    (dims j, j + head_dim/2), so its converter reorders each head's rows from halves to pairs:
    ``w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2)``. Swapping back is the exact inverse.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """A ``gguf.GGUFReader`` for ``path`` and the file's metadata (key -> value); a missing,
    foreign or damaged file is a UserError."""
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist; give the path of a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
        # "GGUF.*" fields describe the file itself (version, counts), not the model. Values are
        # decoded here, so a string that is not UTF-8 is found now (UnicodeDecodeError is a ValueError).
        return reader, {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise UserError(f"{path} cannot be read as GGUF ({str(e).splitlines()[0][:120]}); "
                        "the file is truncated, corrupt or not a GGUF file") from None


def _dequantize(reader: gguf.GGUFReader, path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32, in numpy's dimension order, under its GGUF name."""
    out = {}
    for t in tqdm(reader.tensors, desc=f"dequantise {path.name}", unit="tensor", leave=False):
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                            "cannot dequantise; use a file quantised as F16, Q8_0, Q4_K or Q6_K") from None
        except ValueError as e:  # the data is shorter than its shape says: the file was cut off
            raise UserError(f"{path}: tensor {t.name} cannot be read ({str(e).splitlines()[0][:100]}); "
                            "the file is truncated or corrupt") from None
        out[t.name] = values.reshape(tuple(int(d) for d in reversed(t.shape)))
    return out


def _our_names(arch: Arch, name: str) -> tuple[str, ...] | None:
    """The gptlab tensor(s) that GGUF tensor ``name`` holds, or None for a name not in the tables."""
    if name in arch.global_names:
        return (arch.global_names[name],)
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in arch.layer_names:
        return layer_tensor_names(arch.layer_names[parts[2]], parts[1])
    return None


def _split_rows(t: torch.Tensor, ours: tuple[str, ...], cfg: ModelConfig, path: Path, name: str
                ) -> list[torch.Tensor]:
    """A GGUF tensor cut into the gptlab tensors stacked in it (q rows, then k, then v)."""
    if len(ours) == 1:
        return [t]
    rows = [(cfg.n_head if ".q_proj." in o else cfg.kv_heads) * cfg.head_dim for o in ours]
    if t.shape[0] != sum(rows):
        raise UserError(f"{path}: tensor {name} has {t.shape[0]} rows but the metadata's heads need {sum(rows)}; "
                        "the file is corrupt")
    return list(t.split(rows))


def _unpermuted(t: torch.Tensor, ours: str, arch: Arch, cfg: ModelConfig) -> torch.Tensor:
    """``t`` with llama.cpp's q/k row permutation undone where the architecture applies it."""
    if arch.permute_qk and ours.endswith(("q_proj.weight", "k_proj.weight")):
        heads = cfg.n_head if "q_proj" in ours else cfg.kv_heads
        # A tensor of the wrong shape stays as it is: build_checked names it.
        if t.ndim == 2 and t.shape[0] == heads * cfg.head_dim and cfg.head_dim % 2 == 0:
            return unpermute_qk(t, heads)
    return t


def config_from_metadata(meta: dict[str, Any], path: Path, tied: bool) -> tuple[Arch, ModelConfig]:
    """The ``ModelConfig`` a GGUF file's ``{architecture}.*`` metadata describes."""
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str) or arch_name not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {str(arch_name)[:40]!r} is not supported; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_name]

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch_name}.{key}", default)
        if value is None:
            raise UserError(f"{path} lacks the metadata key {arch_name}.{key}; the file is incomplete")
        return value

    def number(key: str, default: Any = None, kind: type = int) -> Any:
        value = get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{path}: metadata {arch_name}.{key} = {str(value)[:40]!r} is not a number; the file is "
                            "corrupt")
        return kind(value)

    n_embd, n_head = number("embedding_length"), get("attention.head_count")
    if not isinstance(n_head, int) or n_head <= 0:  # some files give a list, one count per layer
        raise UserError(f"{path}: {arch_name}.attention.head_count = {n_head!r}; gptlab needs one positive count "
                        "for every layer")
    # A head is embedding_length / head_count wide unless the file says otherwise (Gemma 3).
    head_dim = number("attention.key_length", n_embd // n_head)
    problems = [f"{arch_name}.{key} = {meta[f'{arch_name}.{key}']} (gptlab needs {head_dim}, the width of a head)"
                for key in ("rope.dimension_count", "attention.value_length")
                if meta.get(f"{arch_name}.{key}", head_dim) != head_dim]
    scaling = meta.get(f"{arch_name}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        problems.append(f"{arch_name}.rope.scaling.type = {scaling}")
    if problems:
        raise UserError(f"{path} uses options gptlab does not implement: {'; '.join(problems)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path} has no tokenizer (tokenizer.ggml.tokens, a list of strings); gptlab needs the "
                        "model's tokenizer")
    defaults = FAMILY_DEFAULTS[arch.family]
    n_layer = number("block_count")
    options = _gemma3_options(number, n_layer, n_embd, n_head, head_dim) if arch.family == "gemma3" else {}
    return arch, ModelConfig.for_family(
        arch.family, vocab_size=len(tokens), block_size=number("context_length"),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, head_dim=None if head_dim * n_head == n_embd else head_dim,
        n_kv_head=number("attention.head_count_kv", n_head), intermediate_size=number("feed_forward_length"),
        rope_theta=number("rope.freq_base", defaults["rope_theta"], float),
        norm_eps=number(arch.norm_eps_key, defaults["norm_eps"], float), tie_embeddings=tied,
        rope_scaling={"rope_type": "linear", "factor": number("rope.scaling.factor", kind=float)}
        if scaling == "linear" else None, **options)


def gemma3_attention_scalar(n_layer: int, n_embd: int, n_head: int, head_dim: int) -> int:
    """Gemma 3's ``query_pre_attn_scalar`` as llama.cpp derives it (the file does not store it):
    n_embd / n_head for the 27B model (62 layers), the head width for every other size."""
    return n_embd // n_head if n_layer == 62 else head_dim


def _gemma3_options(number: Any, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> dict[str, Any]:
    """What llama.cpp's gemma3 architecture fixes rather than reads from the file: five local
    layers to one global, the local layers' RoPE base of 10,000 (never scaled) and the
    attention scale. Without a sliding window (a key newer llama.cpp makes optional) every layer
    is global. A final logit soft-cap is read where the file has one."""
    window = number("attention.sliding_window", 0)
    return {"sliding_window": window or None, "layer_pattern": "LLLLLG" if window else None,
            "rope_local_theta": 10_000.0,
            "query_pre_attn_scalar": float(gemma3_attention_scalar(n_layer, n_embd, n_head, head_dim)),
            "final_logit_softcapping": number("final_logit_softcapping", 0.0, float) or None}


def tokenizer_from_metadata(meta: dict[str, Any], path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer a GGUF file's ``tokenizer.*`` metadata describes, and its
    ``tokenizer_config.json`` dict (special tokens, ``add_bos_token``, the chat template).

    ``tokenizer.ggml.model`` names the kind of vocabulary: "gpt2" is byte-level BPE
    (``_byte_level_tokenizer``), "llama" is SentencePiece BPE (``_sentencepiece_tokenizer``).
    """
    kind = meta.get("tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_tokenizer, "llama": _sentencepiece_tokenizer}
    if not isinstance(kind, str) or kind not in builders:
        raise UserError(f"{path}: tokenizer model {str(kind)[:40]!r} is not supported; gptlab reads byte-level BPE "
                        "('gpt2') and SentencePiece BPE ('llama') GGUF vocabularies")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]  # a list of strings (config_from_metadata checked)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.token_type is not one type per token; the file is corrupt")
    tokenizer = builders[kind](meta, path, tokens, types)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    for name in ("add_bos_token", "add_eos_token"):
        if f"tokenizer.ggml.{name}" in meta:
            config[name] = bool(meta[f"tokenizer.ggml.{name}"])
    if kind == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for a SentencePiece vocabulary
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def _sentencepiece_tokenizer(meta: dict[str, Any], path: Path, tokens: list[str], types: list[Any]
                             ) -> SentencePieceTokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, Gemma): pieces, scores and types, as
    llama.cpp reads them (``add_space_prefix`` on unless the file says otherwise)."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if (not isinstance(scores, list) or len(scores) != len(tokens)
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        raise UserError(f"{path}: tokenizer.ggml.scores is not one number per token; the file is corrupt")
    # llama.cpp's converter writes a user-defined token's "▁" as a space (llama.cpp matches them in
    # the raw text); gptlab matches them in the normalised text, where spaces are "▁".
    pieces = [t.replace(" ", SPACE) if ty == USER_DEFINED else t for t, ty in zip(tokens, types)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    try:
        return SentencePieceTokenizer(pieces, scores, types,
                                      add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                                      unk_id=unk_id if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: the SentencePiece vocabulary is inconsistent ({e}); the file is corrupt") from None


def _byte_level_tokenizer(meta: dict[str, Any], path: Path, tokens: list[str], types: list[Any]) -> HFTokenizer:
    """A Hugging Face byte-level BPE tokenizer.

    Choices follow transformers' own GGUF conversion (``GPT2Tokenizer``: ByteLevel without
    prefix space, ByteLevel decoder; control tokens special, user-defined ones added), except
    that the pre-tokenizer follows ``tokenizer.ggml.pre`` as llama.cpp does (``PRE_TOKENIZERS``).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(bytes_to_unicode().values())
    # Byte-level tokens are spelled in GPT-2's byte alphabet; one that is not (a mislabelled
    # control token) is respelled byte by byte, as transformers does, and is not made special.
    spelled = {t: i for i, t in enumerate(tokens) if set(t) <= alphabet}
    respelled = {render_token(t.encode("utf-8")): i for i, t in enumerate(tokens) if t not in spelled}
    vocab = {**spelled, **respelled}
    listed = meta.get("tokenizer.ggml.merges", [])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else () for m in (listed if isinstance(listed, list) else [0])]
    bad = next((m for m in merges if len(m) != 2 or not {*m, "".join(m)} <= vocab.keys()), None)
    if bad is not None:  # the tokenizers library would refuse it with a bare Exception
        raise UserError(f"{path}: tokenizer.ggml.merges holds {' '.join(bad)[:40]!r}, which does not join two "
                        "tokens of the vocabulary into one; the file is corrupt")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise UserError(f"{path}: tokenizer.ggml.pre is not a string; the file is corrupt")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"{path}: pre-tokenizer {pre!r} is unknown to gptlab; splitting text as GPT-2 does, so ids may "
                      "differ from llama.cpp's", stacklevel=3)
    splits, gpt2_regex = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=gpt2_regex)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL and t in spelled])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in spelled])
    return HFTokenizer(json.loads(tok.to_str()))


def import_gguf(path: str | Path, dtype: str = "fp32") -> GGUFCheckpoint:
    """Load a GGUF file (Llama, Qwen2, GPT-2 or Gemma 3 architecture, byte-level BPE or SentencePiece
    vocabulary) as a gptlab checkpoint in memory; quantised tensors are dequantised, then cast
    to ``dtype``."""
    path = Path(path)
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    reader, meta = read_gguf(path)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    arch, cfg = config_from_metadata(meta, path, tied)
    tokenizer, tokenizer_config = tokenizer_from_metadata(meta, path)

    state: dict[str, torch.Tensor] = {}
    unknown = []
    for name, values in _dequantize(reader, path).items():
        ours = _our_names(arch, name)
        if ours is None:
            unknown.append(name)
            continue
        t = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: F32 data is a read-only memmap
        if norm_shift(arch, name):  # the file holds Gemma's scale 1 + weight; gptlab's norm holds the weight
            t -= norm_shift(arch, name)
        for our_name, part in zip(ours, _split_rows(t, ours, cfg, path, name)):
            state[our_name] = _unpermuted(part, our_name, arch, cfg)
    if unknown:
        raise UserError(f"{path} has tensors gptlab's {arch.family} does not use: {names(unknown[:5])}")
    if tied:
        state["lm_head.weight"] = state.get("embed_tokens.weight")

    # Unexpected tensors are e.g. q/k/v biases in a llama file: gptlab's llama has none. The
    # shapes are checked before the model is built, so metadata declaring a huge model allocates nothing.
    model = build_checked(cfg, state, f"{path} (with its own metadata)")
    model.load_state_dict(state)
    return GGUFCheckpoint(path, model.to(DTYPES[dtype]).eval(), cfg, tokenizer, tokenizer_config)


def save_gguf_import(ckpt: GGUFCheckpoint, out: str | Path) -> None:
    """Write an imported GGUF model as a gptlab checkpoint directory with its
    ``tokenizer_config.json`` (chat template, special tokens) beside it."""
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, extra_json={CHAT_CONFIG: ckpt.tokenizer_config})
