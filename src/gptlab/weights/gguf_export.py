"""GGUF files out: a gptlab model as llama.cpp (and transformers' GGUF reader) loads it.

Export is ``weights/gguf.py``'s import read backwards, from the same tables (``ARCHITECTURES``):
- the family picks llama.cpp's architecture: gpt2, llama (Mistral too, as llama.cpp runs it),
  qwen2 or gemma3; options that architecture does not compute are refused in one line
  (``gguf_architecture``), since the file would load as a different model;
- hyper-parameters go under ``{architecture}.*``, the keys llama.cpp reads;
- tensors are renamed, GPT-2's q, k and v stacked into one ``attn_qkv``, Llama's q and k rows
  permuted into llama.cpp's RoPE layout (``permute_qk``, the inverse of ``unpermute_qk``), and
  Gemma's norm weights stored as the scale they apply, 1 + weight (``Arch.norm_shift``);
- matrices are stored as f32, f16, q8_0 (blocks of 32 values sharing one fp16 scale) or q4_1
  (blocks of 32 4-bit values with an fp16 scale and minimum), quantised by the gguf package and
  read by llama.cpp without its own re-quantisation step; vectors (norms, biases) stay f32, as llama.cpp's own converter leaves them;
- the vocabulary is written as llama.cpp's byte-level BPE (``tokenizer.ggml.model = "gpt2"``:
  tokens, token types, merges and the pre-tokenizer's name) or SentencePiece (``"llama"``:
  pieces, scores, types and the leading-space setting), with the special tokens and the chat
  template (``tokenizer.chat_template``) that gptlab talks to the model with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from gptlab.cache import atomic_path
from gptlab.device import warn
from gptlab.errors import UserError, names
from gptlab.model.config import ModelConfig
from gptlab.tokenizers import CharTokenizer, Tokenizer, to_hf_json
from gptlab.tokenizers.bpe import GPT2_PATTERN
from gptlab.tokenizers.sentencepiece import SPACE, SentencePieceTokenizer
from gptlab.weights.checkpoint import (
    CHAT_CONFIG,
    Checkpoint,
    MissingTokenizer,
    export_chat_files,
)
from gptlab.weights.gguf import (
    ARCHITECTURES,
    CONTROL,
    PRE_TOKENIZERS,
    USER_DEFINED,
    Arch,
    gemma3_attention_scalar,
    layer_tensor_names,
    norm_shift,
)
from gptlab.weights.hf import HF_FAMILY_OF_ARCH, export_problems

Q8_0, Q4_1, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F16
#: --type -> (the file's general.file_type, how matrices are stored; None: float32)
STORAGE = {
    "f32": (gguf.LlamaFileType.ALL_F32, None),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q8_0),
    "q4_1": (gguf.LlamaFileType.MOSTLY_Q4_1, Q4_1),
}
#: gptlab family -> llama.cpp architecture
FAMILY_ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}
NORMAL, UNUSED = 1, 5  # llama.cpp's token types, with CONTROL and USER_DEFINED from weights/gguf.py


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for Llama's q or k weight (``n_head`` heads): each head's rows go
    from Hugging Face's halves (dims j, j + head_dim/2 rotate together) to llama.cpp's pairs
    (dims 2j, 2j+1). The exact inverse of ``weights.gguf.unpermute_qk``."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def gguf_architecture(cfg: ModelConfig) -> str:
    """The llama.cpp architecture that computes what ``cfg`` describes; anything else is a UserError
    naming the options no architecture of its family computes."""
    if cfg.arch not in FAMILY_ARCHITECTURES:
        raise UserError(f"a {cfg.arch} model cannot be exported as GGUF; gptlab writes the families "
                        f"{', '.join(FAMILY_ARCHITECTURES)} (mistral as llama)")
    name = FAMILY_ARCHITECTURES[cfg.arch]
    if name == "llama" and cfg.qkv_has_bias:
        name = "qwen2"  # llama.cpp's qwen2 is llama with q/k/v biases (and without the q/k permutation)
    # llama.cpp's gpt2, llama, qwen2 and gemma3 compute what transformers' classes of those names
    # do (weights/hf.py's table of options), with RoPE scaling and sliding windows as below.
    problems = export_problems(cfg, HF_FAMILY_OF_ARCH.get(name, name))
    scaling = (cfg.rope_scaling or {}).get("rope_type")
    if scaling not in (None, "linear"):
        problems.append(f"rope_scaling type {scaling!r} (gptlab writes only linear RoPE scaling to GGUF)")
    if name == "gpt2" and cfg.sliding_window is not None and cfg.sliding_window < cfg.block_size:
        problems.append(f"sliding_window={cfg.sliding_window} (gpt2 attends to every earlier token)")
    if name == "gemma3":
        problems += _gemma3_problems(cfg)
    if problems:
        raise UserError(f"the model uses {'; '.join(problems)}, which llama.cpp's {name} architecture does not "
                        "compute, so a GGUF export would load as a different model")
    return name


def _gemma3_problems(cfg: ModelConfig) -> list[str]:
    """What llama.cpp's gemma3 fixes rather than reads from the file (``weights.gguf._gemma3_options``)
    and ``cfg`` sets otherwise: the layer pattern, the local RoPE base, the attention scale."""
    problems = []
    fixed = ["global" if (i + 1) % 6 == 0 else "local" for i in range(cfg.n_layer)]
    if cfg.sliding_window is None or [cfg.layer_kind(i) for i in range(cfg.n_layer)] != fixed:
        problems.append(f"layer_pattern={cfg.layer_pattern!r} with sliding_window={cfg.sliding_window} (gemma3 makes "
                        "every sixth layer global and the others local: 'LLLLLG' with a window)")
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    if "local" in cfg.attention_kinds and local_theta != 10_000:
        problems.append(f"a local RoPE base of {local_theta:g} (gemma3's local layers use 10000)")
    scalar = gemma3_attention_scalar(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_dim)
    if (cfg.query_pre_attn_scalar or cfg.head_dim) != scalar:
        problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (gemma3 computes {scalar} for "
                        f"{cfg.n_layer} layers)")
    return problems


def _context_length(cfg: ModelConfig, arch_name: str) -> int:
    """The context written: the model's, or its sliding window where that is shorter, because
    llama.cpp's llama and qwen2 attend to every earlier token; within the window both agree.
    (gemma3 has sliding windows of its own.)"""
    if cfg.sliding_window is None or cfg.sliding_window >= cfg.block_size or arch_name == "gemma3":
        return cfg.block_size
    warn(f"llama.cpp has no sliding-window attention for this family: the GGUF file declares a context of "
         f"{cfg.sliding_window} tokens (the window) instead of {cfg.block_size}, so both compute the same")
    return cfg.sliding_window


def _write_hparams(w: gguf.GGUFWriter, arch: Arch, cfg: ModelConfig) -> None:
    w.add_context_length(_context_length(cfg, w.arch))
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_float32(f"{w.arch}.{arch.norm_eps_key}", cfg.norm_eps)
    # llama.cpp's default is embedding_length / head_count; transformers reads gemma3's head width here.
    if cfg.head_dim * cfg.n_head != cfg.n_embd or w.arch == "gemma3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if w.arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)  # _gemma3_problems checked that it is set
        if cfg.final_logit_softcapping is not None:  # newer llama.cpp reads it; older ones ignore it
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if cfg.pos_embedding == "rope":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        if cfg.rope_scaling is not None:  # linear (gguf_architecture refused the others): positions / factor
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(cfg.rope_scaling["factor"])


# --- tensors --------------------------------------------------------------------------------

def _zero_bias(name: str, state: dict[str, torch.Tensor], arch_name: str) -> torch.Tensor:
    """Zeros for a bias the architecture always stores but the model does not have (a gpt2 model
    built with bias=False, a qwen2 one with qkv_bias=False): adding zero changes nothing."""
    weight = name.removesuffix(".bias") + ".weight"
    if not name.endswith(".bias") or weight not in state:
        raise UserError(f"the model has no {name}, which llama.cpp's {arch_name} needs")
    return torch.zeros(state[weight].shape[0])


def gguf_tensors(model: torch.nn.Module, arch: Arch, arch_name: str) -> dict[str, np.ndarray]:
    """Every tensor the architecture stores, under its GGUF name, as float32 in numpy's order
    (rows first; the writer records ggml's reversed shape). Every tensor of the model is used."""
    cfg: ModelConfig = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    table = [(name, (ours,)) for name, ours in arch.global_names.items()]
    table += [(f"blk.{i}.{name}", layer_tensor_names(ours, str(i)))
              for i in range(cfg.n_layer) for name, ours in arch.layer_names.items()]
    out, used = {}, {"lm_head.weight"} if cfg.tie_embeddings else set()
    for name, ours in table:
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # llama.cpp (and transformers) use token_embd when the file has no output
        t = torch.cat([state[o] if o in state else _zero_bias(o, state, arch_name) for o in ours])
        if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute_qk(t, cfg.n_head if name.endswith("attn_q.weight") else cfg.kv_heads)
        if norm_shift(arch, name):  # Gemma's norms are stored as their scale, 1 + weight
            t = t + norm_shift(arch, name)
        out[name] = t.numpy()
        used.update(ours)
    unused = sorted(set(state) - used)
    if unused:
        raise UserError(f"the model has tensors llama.cpp's {arch_name} has no place for: {names(unused[:5])}")
    return out


def _stored(values: np.ndarray, qtype: gguf.GGMLQuantizationType | None
            ) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The bytes a tensor is written as, and their type (None: the array's own, f32 or f16).
    Vectors stay f32; a matrix whose rows are not whole blocks of 32 falls back to f16, as in
    llama.cpp's converter."""
    if values.ndim == 1 or qtype is None:
        return np.ascontiguousarray(values, dtype=np.float32), None
    if qtype in (Q8_0, Q4_1) and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype), qtype
    return np.ascontiguousarray(values, dtype=np.float16), None


# --- the vocabulary -------------------------------------------------------------------------

@dataclass
class GGUFVocab:
    """A vocabulary as llama.cpp holds it (``tokenizer.ggml.*``)."""

    model: str
    """``tokenizer.ggml.model``: "gpt2" for byte-level BPE (tokens and merges), "llama" for
    SentencePiece (pieces and scores)."""
    tokens: list[str]
    """Every id's token: byte-level BPE's spelled in GPT-2's byte alphabet, SentencePiece's pieces
    with "▁" for a space (but a space in user-defined pieces); special tokens as themselves."""
    types: list[int]
    """llama.cpp's token type of each id: normal, control (special), user-defined, unused (padding),
    and for SentencePiece unknown and byte."""
    pre: str
    """llama.cpp's name of the pre-tokenizer that cuts text before BPE (``PRE_TOKENIZERS``)."""
    merges: list[str] = field(default_factory=list)
    """Byte-level BPE's merges in rank order, each "left right"."""
    scores: list[float] = field(default_factory=list)
    """SentencePiece's score of each piece: the higher, the earlier it merges."""
    add_space_prefix: bool = False
    """Whether SentencePiece puts a "▁" before the text (its add_dummy_prefix)."""
    unk_id: int | None = None
    """SentencePiece's unknown piece, if it has one."""


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """The ``tokenizer.ggml.pre`` that cuts text as Hugging Face pre-tokenizer ``pre`` (a
    tokenizer.json's ``pre_tokenizer``) does, or None when llama.cpp knows no such one."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    patterns = []
    for step in steps[:-1]:
        if step.get("type") == "Digits" and step.get("individual_digits"):
            patterns.append(r"\p{N}")  # Rust's is_numeric, which Digits tests, is \p{N}
        elif (step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert")
              and "Regex" in (step.get("pattern") or {})):
            patterns.append(step["pattern"]["Regex"])
        else:
            return None
    byte_regex = steps[-1].get("use_regex", True)
    if patterns[-1:] == [GPT2_PATTERN] and not byte_regex:  # GPT-2's regex as a Split is ByteLevel's own
        patterns, byte_regex = patterns[:-1], True
    return next((name for name, rule in PRE_TOKENIZERS.items() if rule == (tuple(patterns), byte_regex)), None)


def _bpe_problems(hf: dict[str, Any]) -> list[str]:
    """What keeps a tokenizer.json from being llama.cpp's byte-level BPE."""
    model, decoder = hf.get("model") or {}, hf.get("decoder") or {}
    if model.get("type") != "BPE":
        return [f"its model is {model.get('type')!r}, not byte-level BPE"]
    problems = [f"BPE option {key}={model[key]!r}" for key in
                ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")
                if model.get(key)]
    if (hf.get("normalizer") or {"type": "NFC"}).get("type") != "NFC":  # NFC text is unchanged by NFC
        problems.append(f"normalizer {hf['normalizer'].get('type')!r} (llama.cpp does not normalise text)")
    decoders = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    if not any(d.get("type") == "ByteLevel" for d in decoders):
        problems.append("no ByteLevel decoder")
    if pre_tokenizer_name(hf.get("pre_tokenizer")) is None:
        problems.append(f"a pre-tokenizer that none of llama.cpp's ({', '.join(PRE_TOKENIZERS)}) matches")
    if not model.get("merges"):
        problems.append("no merges (llama.cpp needs at least one)")
    return problems


def _check_fits(last_id: int, n_vocab: int) -> None:
    if last_id >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {last_id} but the model only {n_vocab}; they do not belong "
                        "together")


def _sentencepiece_vocab(tokenizer: SentencePieceTokenizer, n_vocab: int) -> GGUFVocab:
    """A SentencePiece vocabulary as llama.cpp's converter writes it, the inverse of
    ``weights.gguf._sentencepiece_tokenizer``: pieces, scores and types as they are, but a
    user-defined piece's "▁" as a space (llama.cpp finds those pieces in the raw text)."""
    if tokenizer.remove_extra_whitespaces:
        raise UserError("the SentencePiece tokenizer joins runs of spaces (remove_extra_whitespaces), which "
                        "llama.cpp's never does, so it has no faithful GGUF form")
    _check_fits(tokenizer.vocab_size - 1, n_vocab)
    pad = [f"[PAD{i}]" for i in range(tokenizer.vocab_size, n_vocab)]
    pieces = [p.replace(SPACE, " ") if t == USER_DEFINED else p for p, t in zip(tokenizer.pieces, tokenizer.types)]
    # Padding scores as low as llama.cpp's converter gives them, so that no merge prefers them.
    return GGUFVocab("llama", pieces + pad, tokenizer.types + [UNUSED] * len(pad), "default",
                     scores=tokenizer.scores + [-1000.0] * len(pad), add_space_prefix=tokenizer.add_space_prefix,
                     unk_id=tokenizer.unk_id)


def gguf_vocab(tokenizer: Tokenizer, n_vocab: int) -> GGUFVocab:
    """``tokenizer`` as llama.cpp's SentencePiece (``_sentencepiece_vocab``) or byte-level BPE with
    ``n_vocab`` ids (ids the tokenizer does not use, such as a padded embedding's, become unused
    ``[PADn]`` tokens); a tokenizer that has no faithful form there is refused, saying why."""
    if isinstance(tokenizer, MissingTokenizer):
        raise tokenizer.error()
    if isinstance(tokenizer, SentencePieceTokenizer):
        return _sentencepiece_vocab(tokenizer, n_vocab)
    if isinstance(tokenizer, CharTokenizer):
        raise UserError("a character-level tokenizer has no GGUF form: llama.cpp reads a vocabulary as byte-level BPE "
                        "only with at least one merge, and spells a character of several bytes only through merges of "
                        "byte tokens, none of which a character vocabulary has; export it with --format hf, or train "
                        "with a BPE tokenizer (--tokenizer bpe:N) for GGUF")
    hf = to_hf_json(tokenizer)
    problems = _bpe_problems(hf)
    if problems:
        raise UserError(f"the tokenizer cannot be written as llama.cpp's byte-level BPE: {'; '.join(problems)}")
    pieces = {i: t for t, i in hf["model"]["vocab"].items()}
    types = dict.fromkeys(pieces, NORMAL)
    for added in hf.get("added_tokens", []):
        pieces[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    _check_fits(max(pieces), n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    return GGUFVocab("gpt2", [pieces.get(i, f"[PAD{i}]") for i in range(n_vocab)],
                     [types.get(i, UNUSED) for i in range(n_vocab)], pre_tokenizer_name(hf["pre_tokenizer"]), merges)


def _write_vocab(w: gguf.GGUFWriter, vocab: GGUFVocab, chat: dict[str, Any]) -> None:
    """The vocabulary, its special tokens and the chat template. The BOS goes before a text where
    the model's settings say so (add_bos_token), in llama.cpp as in gptlab; an EOS never does
    unless they say so too."""
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        w.add_token_merges(vocab.merges)
    else:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.unk_id is not None:
        w.add_unk_token_id(vocab.unk_id)
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id)):
        if chat.get(key) in ids:
            add(ids[chat[key]])
    w.add_add_bos_token(bool(chat.get("add_bos_token", False)))
    w.add_add_eos_token(bool(chat.get("add_eos_token", False)))
    w.add_chat_template(chat["chat_template"])


# --- the file -------------------------------------------------------------------------------

def check_target(out: str | Path, storage: str) -> str:
    """Refuse an --out or --type that ``export_gguf`` cannot write (before a model is loaded for it);
    returns the storage type as ``STORAGE`` spells it."""
    out = Path(out)
    if storage.lower() not in STORAGE:
        raise UserError(f"--type {storage!r} is not a GGUF storage type gptlab writes; use one of {', '.join(STORAGE)}")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out} must end in .gguf: gptlab, llama.cpp and transformers know GGUF files by it")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; a GGUF export is one file")
    return storage.lower()


def export_gguf(ckpt: Checkpoint, out: str | Path, storage: str = "f32") -> None:
    """Write ``ckpt`` as one GGUF file that llama.cpp runs and gptlab imports back: exactly at f32,
    within rounding at f16, q8_0 and q4_1 (``storage``). Everything is checked before the file is
    written, and the file appears only once complete."""
    out, storage = Path(out), check_target(out, storage)
    name = gguf_architecture(ckpt.config)
    arch = ARCHITECTURES[name]
    vocab = gguf_vocab(ckpt.tokenizer, ckpt.config.vocab_size)
    chat = export_chat_files(ckpt)[CHAT_CONFIG]
    tensors = gguf_tensors(ckpt.model, arch, name)
    file_type, qtype = STORAGE[storage]
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, name)
        w.add_file_type(file_type)
        if qtype in (Q8_0, Q4_1):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(w, arch, ckpt.config)
        _write_vocab(w, vocab, chat)
        for tensor_name, values in tensors.items():
            data, raw_dtype = _stored(values, qtype)
            w.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()
