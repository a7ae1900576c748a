"""Hugging Face checkpoints in and out: a table of names per family, and a few transforms.

Because gptlab's parameter names follow Hugging Face's Llama tree, a family's mapping is a
short table of ``Rule``s: which HF tensor becomes which of ours, and how. ``{i}`` stands for
the layer index. Transforms:
- ``copy``: same tensor;
- ``transpose``: GPT-2 stores its linear layers as ``Conv1D`` with the weight as (in, out);
  ``nn.Linear`` keeps (out, in);
- ``split3``: GPT-2's fused ``c_attn`` holds q, k and v side by side; we keep three projections
  (a ``transpose`` first for weights).

Llama, Qwen2 and Mistral already use gptlab's names under a ``model.`` prefix, so their tables
are nearly the identity; Qwen2 adds the q/k/v biases, Gemma 3 (``gemma3_text``) its QK-norms and
sandwich norms. Gemma's norm weights are stored zero-centred (the scale is 1 + weight) in both
trees, so they too are plain copies.

The same table runs both ways (import and export), and the tests check that it covers every
key of a real ``transformers`` model in both directions.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.cache import atomic_dir, write_json
from gptlab.errors import UserError
from gptlab.model.config import FAMILY_DEFAULTS, ModelConfig
from gptlab.weights import check_state_dict


@dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple[str, ...]
    transform: str = "copy"  # copy | transpose | split3


GPT2_RULES = (
    Rule("transformer.wte.weight", ("embed_tokens.weight",)),
    Rule("transformer.wpe.weight", ("embed_positions.weight",)),
    Rule("transformer.h.{i}.ln_1.weight", ("layers.{i}.input_layernorm.weight",)),
    Rule("transformer.h.{i}.ln_1.bias", ("layers.{i}.input_layernorm.bias",)),
    Rule("transformer.h.{i}.attn.c_attn.weight", ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.k_proj.weight",
                                                  "layers.{i}.self_attn.v_proj.weight"), "split3"),
    Rule("transformer.h.{i}.attn.c_attn.bias", ("layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.k_proj.bias",
                                                "layers.{i}.self_attn.v_proj.bias"), "split3"),
    Rule("transformer.h.{i}.attn.c_proj.weight", ("layers.{i}.self_attn.o_proj.weight",), "transpose"),
    Rule("transformer.h.{i}.attn.c_proj.bias", ("layers.{i}.self_attn.o_proj.bias",)),
    Rule("transformer.h.{i}.ln_2.weight", ("layers.{i}.post_attention_layernorm.weight",)),
    Rule("transformer.h.{i}.ln_2.bias", ("layers.{i}.post_attention_layernorm.bias",)),
    Rule("transformer.h.{i}.mlp.c_fc.weight", ("layers.{i}.mlp.up_proj.weight",), "transpose"),
    Rule("transformer.h.{i}.mlp.c_fc.bias", ("layers.{i}.mlp.up_proj.bias",)),
    Rule("transformer.h.{i}.mlp.c_proj.weight", ("layers.{i}.mlp.down_proj.weight",), "transpose"),
    Rule("transformer.h.{i}.mlp.c_proj.bias", ("layers.{i}.mlp.down_proj.bias",)),
    Rule("transformer.ln_f.weight", ("norm.weight",)),
    Rule("transformer.ln_f.bias", ("norm.bias",)),
    Rule("lm_head.weight", ("lm_head.weight",)),
)


def _gpt2_config_in(c: dict[str, Any]) -> dict[str, Any]:
    if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"GPT-2 activation {c['activation_function']!r} is not supported (gptlab's GPT-2 uses "
                        "the tanh GELU, gelu_new)")
    inner = c.get("n_inner")
    if inner is not None and inner != 4 * c["n_embd"]:
        raise UserError(f"GPT-2 n_inner={inner} is not supported; gptlab's GPT-2 MLP is 4 x n_embd")
    return {**FAMILY_DEFAULTS["gpt2"], "arch": "gpt2", "norm_eps": c.get("layer_norm_epsilon", 1e-5),
            "vocab_size": c["vocab_size"], "block_size": c.get("n_positions", 1024),
            "n_layer": c["n_layer"], "n_head": c["n_head"], "n_embd": c["n_embd"], "bias": True,
            "tie_embeddings": c.get("tie_word_embeddings", True)}


def _gpt2_config_out(cfg: ModelConfig, special: dict[str, int]) -> dict[str, Any]:
    eos = special.get("<|endoftext|>")
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32"}


# Llama, Qwen2 and Mistral name their tensors as gptlab does, under a "model." prefix.
_LLAMA_NAMES = ("embed_tokens.weight", "layers.{i}.input_layernorm.weight", "layers.{i}.self_attn.q_proj.weight",
                "layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.v_proj.weight",
                "layers.{i}.self_attn.o_proj.weight", "layers.{i}.post_attention_layernorm.weight",
                "layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.down_proj.weight",
                "norm.weight")
_QKV_BIASES = ("layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.k_proj.bias", "layers.{i}.self_attn.v_proj.bias")
LLAMA_RULES = tuple(Rule("model." + n, (n,)) for n in _LLAMA_NAMES) + (Rule("lm_head.weight", ("lm_head.weight",)),)
QWEN2_RULES = LLAMA_RULES + tuple(Rule("model." + n, (n,)) for n in _QKV_BIASES)


def _rope_in(c: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either layout: transformers 5's ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling`` that most published config.json files still use."""
    params = dict(c.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
    scaling = c.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.pop("type", None))
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _llama_config_in(c: dict[str, Any], family: str) -> dict[str, Any]:
    problems = []
    if c.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {c['hidden_act']!r} (only silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias (biases on every projection)")
    partial = (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        problems.append(f"partial_rotary_factor {partial} (RoPE on part of each head)")
    if problems:
        raise UserError(f"this {family} checkpoint uses options gptlab does not implement: {'; '.join(problems)}")
    window = c.get("sliding_window") if family == "mistral" or c.get("use_sliding_window") else None
    head_dim = c.get("head_dim")
    if head_dim == c["hidden_size"] // c["num_attention_heads"]:
        head_dim = None  # the width gptlab derives anyway
    return {**FAMILY_DEFAULTS[family], "arch": family, "vocab_size": c["vocab_size"], "head_dim": head_dim,
            "block_size": c.get("max_position_embeddings", 2048), "n_layer": c["num_hidden_layers"],
            "n_head": c["num_attention_heads"], "n_kv_head": c.get("num_key_value_heads") or c["num_attention_heads"],
            "n_embd": c["hidden_size"], "intermediate_size": c["intermediate_size"],
            "norm_eps": c.get("rms_norm_eps", 1e-6), "tie_embeddings": c.get("tie_word_embeddings", False),
            "sliding_window": window, **_rope_in(c)}


def _llama_config_out(cfg: ModelConfig, special: dict[str, int], family: str) -> dict[str, Any]:
    names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    out = {"model_type": family, "architectures": [names[family]], "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
           "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
           "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "rope_scaling": cfg.rope_scaling,
           "attention_bias": False, "torch_dtype": "float32"}
    if family == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if family == "qwen2":
        out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    return out


# Gemma 3 (text only, Gemma3ForCausalLM): Llama's names plus the QK-norms and the two norms around the MLP.
_GEMMA3_NAMES = _LLAMA_NAMES + ("layers.{i}.self_attn.q_norm.weight", "layers.{i}.self_attn.k_norm.weight",
                                "layers.{i}.pre_feedforward_layernorm.weight",
                                "layers.{i}.post_feedforward_layernorm.weight")
GEMMA3_RULES = tuple(Rule("model." + n, (n,)) for n in _GEMMA3_NAMES) + (Rule("lm_head.weight", ("lm_head.weight",)),)
# HF's layer types and gptlab's layer_pattern letters.
_GEMMA3_LAYER_TYPES = {"sliding_attention": "L", "full_attention": "G"}


def _gemma3_layer_pattern(c: dict[str, Any]) -> str:
    """HF's ``layer_types`` (or the older ``sliding_window_pattern`` N: every Nth layer global) as
    a layer_pattern, cut to its shortest period: "LLLLLG" for Gemma 3's five local per global."""
    n = c["num_hidden_layers"]
    types = c.get("layer_types")
    if types is None:
        every = c.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    unknown = sorted(set(types) - set(_GEMMA3_LAYER_TYPES))
    if unknown or len(types) != n:
        what = f"layer types {', '.join(map(str, unknown))}" if unknown else f"{len(types)} layer_types for {n} layers"
        raise UserError(f"this gemma3_text checkpoint has {what}; gptlab reads sliding_attention and full_attention, "
                        "one per layer")
    pattern = "".join(_GEMMA3_LAYER_TYPES[t] for t in types)
    return next(pattern[:p] for p in range(1, n + 1) if (pattern[:p] * n)[:n] == pattern)


def _gemma3_rope_in(c: dict[str, Any]) -> dict[str, Any]:
    """Global and local RoPE from transformers 5's ``rope_parameters`` keyed by layer type, or from
    the older flat ``rope_theta``, ``rope_scaling`` (global layers) and ``rope_local_base_freq``."""
    params = c.get("rope_parameters") or {}
    full, sliding = dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    if sliding.get("rope_type", "default") != "default":
        raise UserError(f"this gemma3_text checkpoint scales the RoPE of its local layers ({sliding['rope_type']}); "
                        "gptlab scales only the global layers' RoPE, as Gemma 3 does")
    global_rope = _rope_in({"rope_parameters": full, "rope_theta": c.get("rope_theta") or 1_000_000.0,
                            "rope_scaling": c.get("rope_scaling")})
    local_theta = sliding.get("rope_theta") or c.get("rope_local_base_freq") or 10_000.0
    return {**global_rope, "rope_local_theta": float(local_theta)}


def _gemma3_config_in(c: dict[str, Any]) -> dict[str, Any]:
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    problems = [f"hidden_activation {act!r} (only gelu_pytorch_tanh)"] if act != "gelu_pytorch_tanh" else []
    if c.get("attention_bias"):
        problems.append("attention_bias (biases on q, k, v and o)")
    if c.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention (an encoder: gptlab's attention is causal)")
    if problems:
        raise UserError(f"this gemma3_text checkpoint uses options gptlab does not implement: {'; '.join(problems)}")
    return {**FAMILY_DEFAULTS["gemma3"], "vocab_size": c["vocab_size"],
            "block_size": c.get("max_position_embeddings", 131_072), "n_layer": c["num_hidden_layers"],
            "n_head": c["num_attention_heads"], "n_kv_head": c.get("num_key_value_heads") or c["num_attention_heads"],
            "n_embd": c["hidden_size"], "head_dim": c.get("head_dim", 256), "intermediate_size": c["intermediate_size"],
            "norm_eps": c.get("rms_norm_eps", 1e-6), "tie_embeddings": c.get("tie_word_embeddings", True),
            "sliding_window": c.get("sliding_window", 4096), "layer_pattern": _gemma3_layer_pattern(c),
            "query_pre_attn_scalar": c.get("query_pre_attn_scalar", 256),
            # attn_logit_softcapping is left out: transformers' Gemma 3 keeps it in its config but
            # never applies it (Gemma 2 did), and the weights were made without it.
            "final_logit_softcapping": c.get("final_logit_softcapping"), **_gemma3_rope_in(c)}


def _gemma3_config_out(cfg: ModelConfig, special: dict[str, int]) -> dict[str, Any]:
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    full = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    eos = special.get("<eos>", next(iter(special.values()), None))
    return {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "layer_types": [{"local": "sliding_attention", "global": "full_attention"}[cfg.layer_kind(i)]
                            for i in range(cfg.n_layer)],
            # transformers builds a sliding mask even when no layer uses it, so it needs some window.
            "sliding_window": cfg.sliding_window or cfg.block_size,
            "rope_parameters": {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
            "rope_theta": cfg.rope_theta, "rope_local_base_freq": local_theta, "rope_scaling": cfg.rope_scaling,
            # transformers type-checks this field as an int (Gemma's values are whole numbers).
            "query_pre_attn_scalar": _whole(cfg.query_pre_attn_scalar or cfg.head_dim),
            "attn_logit_softcapping": None, "final_logit_softcapping": cfg.final_logit_softcapping,
            "attention_bias": False,
            "use_bidirectional_attention": False, "bos_token_id": special.get("<bos>", eos), "eos_token_id": eos,
            "pad_token_id": special.get("<pad>"), "torch_dtype": "float32"}


def _whole(x: float) -> int | float:
    """A whole number as an int (JSON ``256``, not ``256.0``), anything else unchanged."""
    return int(x) if float(x).is_integer() else x


# The options each family's transformers class computes, as ModelConfig values: a model whose
# options differ would load in transformers as a different model, so export refuses it.
_NO_GEMMA = {"learned_qk_norm": False, "sandwich_norm": False, "embed_scale": False, "query_pre_attn_scalar": None,
             "attn_logit_softcapping": None, "final_logit_softcapping": None}
_GPT2_COMPUTES = {"mlp": "gelu", "qk_norm": False, "pos_embedding": "learned", "norm": "layernorm", **_NO_GEMMA}
_LLAMA_COMPUTES = {"mlp": "swiglu", "qk_norm": False, "pos_embedding": "rope", "norm": "rmsnorm", "bias": False,
                   "layer_pattern": None, "rope_local_theta": None, **_NO_GEMMA}
_GEMMA3_COMPUTES = {"mlp": "geglu", "qk_norm": False, "pos_embedding": "rope", "norm": "rmsnorm_offset",
                    "bias": False, "qkv_has_bias": False, "learned_qk_norm": True, "sandwich_norm": True,
                    "embed_scale": True, "attn_logit_softcapping": None}


@dataclass(frozen=True)
class Family:
    rules: tuple[Rule, ...]
    config_in: Any  # HF config.json dict -> ModelConfig kwargs
    config_out: Any  # (ModelConfig, special tokens) -> HF config.json dict
    #: HF buffers that are not weights (older GPT-2 files carry the causal mask)
    ignore_suffixes: tuple[str, ...] = ()
    #: ModelConfig option -> the value this family's transformers class computes
    computes: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(GPT2_RULES, _gpt2_config_in, _gpt2_config_out, (".attn.bias", ".attn.masked_bias"),
                   _GPT2_COMPUTES),
    **{name: Family(rules, functools.partial(_llama_config_in, family=name),
                    functools.partial(_llama_config_out, family=name), (".rotary_emb.inv_freq",),
                    {**_LLAMA_COMPUTES, **({} if name == "qwen2" else {"qkv_has_bias": False})})
       for name, rules in (("llama", LLAMA_RULES), ("qwen2", QWEN2_RULES), ("mistral", LLAMA_RULES))},
    "gemma3_text": Family(GEMMA3_RULES, _gemma3_config_in, _gemma3_config_out, (".rotary_emb.inv_freq",),
                          _GEMMA3_COMPUTES),
}
#: gptlab family names (ModelConfig.arch) whose Hugging Face model_type differs
HF_FAMILY_OF_ARCH = {"gemma3": "gemma3_text"}


def export_problems(cfg: ModelConfig, family: str) -> list[str]:
    """What in ``cfg`` the ``family`` format of transformers would compute otherwise, one phrase each."""
    problems = [f"{name}={getattr(cfg, name)!r} ({family} computes {value!r})"
                for name, value in FAMILIES[family].computes.items() if getattr(cfg, name) != value]
    if family == "gpt2" and cfg.head_dim * cfg.n_head != cfg.n_embd:
        problems.append(f"head_dim={cfg.head_dim} (gpt2's heads are n_embd // n_head wide)")
    local = "local" in cfg.attention_kinds
    if family == "gemma3_text" and local and cfg.rope_scaling is not None and cfg.rope_local_theta is None:
        problems.append("rope_scaling on local layers (gemma3_text scales only the global layers' RoPE; set "
                        "rope_local_theta)")
    return problems


# --- the table, applied -----------------------------------------------------------------------

def _expand(rules: tuple[Rule, ...], n_layer: int) -> list[Rule]:
    out = []
    for r in rules:
        layers = range(n_layer) if "{i}" in r.hf else [None]
        for i in layers:
            fmt = (lambda s: s) if i is None else (lambda s, i=i: s.replace("{i}", str(i)))
            out.append(Rule(fmt(r.hf), tuple(fmt(o) for o in r.ours), r.transform))
    return out


def hf_to_ours(hf: dict[str, torch.Tensor], family: str, cfg: ModelConfig, expected: dict[str, torch.Size]
               ) -> dict[str, torch.Tensor]:
    """Rename and reshape an HF state dict into gptlab's; every tensor is accounted for."""
    fam = FAMILIES[family]
    hf = {k: v for k, v in hf.items() if not k.endswith(fam.ignore_suffixes)}
    ours: dict[str, torch.Tensor] = {}
    used = set()
    for rule in _expand(fam.rules, cfg.n_layer):
        if rule.hf not in hf:
            continue
        t = hf[rule.hf]
        used.add(rule.hf)
        if rule.transform == "transpose":
            ours[rule.ours[0]] = t.t().contiguous()
        elif rule.transform == "split3":
            parts = (t.t() if t.dim() == 2 else t).chunk(3, dim=0)
            ours.update({name: p.contiguous() for name, p in zip(rule.ours, parts)})
        else:
            ours[rule.ours[0]] = t
    unused = sorted(set(hf) - used)
    if unused:
        raise UserError(f"the checkpoint has tensors gptlab's {family} does not use: {', '.join(unused[:5])}")
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)
        ours["lm_head.weight"] = ours.get("embed_tokens.weight")
    check_state_dict(ours, expected, f"the {family} checkpoint")
    return ours


def ours_to_hf(state: dict[str, torch.Tensor], family: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_to_ours``. Biases an HF family always has are written as zeros when
    the gptlab model has none; a tied head is left out, as transformers saves it."""
    hf: dict[str, torch.Tensor] = {}
    for rule in _expand(FAMILIES[family].rules, cfg.n_layer):
        if cfg.tie_embeddings and rule.hf == "lm_head.weight":
            continue
        if not all(o in state for o in rule.ours):
            like = rule.ours[0].replace(".bias", ".weight")
            if rule.hf.endswith(".bias") and like in state:
                rows = state[like].shape[0] * len(rule.ours)
                hf[rule.hf] = torch.zeros(rows, dtype=state[like].dtype)
                continue
            raise UserError(f"the model has no {rule.ours[0]}, which {family} format needs")
        parts = [state[o] for o in rule.ours]
        if rule.transform == "transpose":
            hf[rule.hf] = parts[0].t().contiguous()
        elif rule.transform == "split3":
            cat = torch.cat(parts, dim=0)
            hf[rule.hf] = (cat.t() if cat.dim() == 2 else cat).contiguous()
        else:
            hf[rule.hf] = parts[0].contiguous()
    return hf


# --- directories --------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: files copied along with the weights (chat template, generation defaults)
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(d, dict) and "model_type" in d


def read_config_json(path: Path) -> dict[str, Any]:
    """A Hugging Face directory's config.json as a dict; unreadable or not an object -> UserError."""
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'} cannot be read ({e})") from None
    if not isinstance(c, dict):
        raise UserError(f"{path / 'config.json'} does not hold a JSON object")
    return c


def read_tokenizer(path: Path, vocab_size: int):
    """The directory's tokenizer.json, checked to fit a model of ``vocab_size`` ids; a
    ``MissingTokenizer`` for a directory of weights only (it says how to add one when text is needed)."""
    from gptlab.weights.checkpoint import check_tokenizer_fits, load_tokenizer

    return check_tokenizer_fits(load_tokenizer(path, vocab_size), vocab_size, path / "tokenizer.json")


def read_hf_config(path: Path) -> tuple[str, ModelConfig]:
    c = read_config_json(path)
    family = c.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{path}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    return family, ModelConfig(**FAMILIES[family].config_in(c))


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is corrupt ({e})") from None
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{path} has no model.safetensors (or sharded index); only safetensors weights are read, "
                        "never pickled .bin files")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(str(path / shard)))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path / shard} cannot be read ({e}); the file is truncated or corrupt") from None
    return state


def import_hf(path: str | Path, dtype: str = "fp32", tokenizer=None):
    """Load a Hugging Face model directory as a gptlab ``Checkpoint`` (in memory), with its own
    tokenizer.json or, when given, ``tokenizer`` (checked to fit the model)."""
    from gptlab.model.transformer import GPT
    from gptlab.weights.checkpoint import Checkpoint, check_tokenizer_fits

    path = Path(path)
    family, cfg = read_hf_config(path)
    model = GPT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = hf_to_ours(read_hf_weights(path), family, cfg, expected)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    tokenizer = (read_tokenizer(path, cfg.vocab_size) if tokenizer is None
                 else check_tokenizer_fits(tokenizer, cfg.vocab_size, "the tokenizer given"))
    return Checkpoint(path, model.to(DTYPES[dtype]), cfg, tokenizer)


def save_imported(ckpt, out: str | Path, source: Path) -> None:
    """Write an imported model as a gptlab checkpoint directory, keeping its side files (written
    with the rest, so an interrupted import never leaves a checkpoint without its chat template).
    Weights without a tokenizer are saved with a one-line warning."""
    from gptlab.device import warn
    from gptlab.weights.checkpoint import MissingTokenizer, save_checkpoint

    if isinstance(ckpt.tokenizer, MissingTokenizer):
        warn(f"{source} has no tokenizer.json, so only its weights are imported: they run, export and evaluate on "
             f"ids; to read or write text, import it with --tokenizer TOKENIZER (a tokenizer.json, gpt2 or a model)")
    side = {name: (source / name).read_bytes() for name in SIDE_FILES if (source / name).is_file()}
    save_checkpoint(out, ckpt.model, ckpt.tokenizer, extra_json=side)


def export_hf(ckpt, out: str | Path, family: str = "gpt2") -> None:
    """Write a checkpoint as a Hugging Face directory that ``transformers`` loads."""
    from gptlab.tokenizers import to_hf_json
    from gptlab.weights.checkpoint import MissingTokenizer, export_chat_files

    family = HF_FAMILY_OF_ARCH.get(family, family)
    if family not in FAMILIES:
        raise UserError(f"cannot export as {family!r}; supported: {', '.join(FAMILIES)}")
    cfg = ckpt.config
    unsupported = export_problems(cfg, family)
    if unsupported:
        raise UserError(f"the model uses {', '.join(unsupported)}, which the {family} format of transformers does not "
                        "compute, so an export would load as a different model; export models of a supported family")
    state = {k: v.detach() for k, v in ckpt.model.state_dict().items()}
    hf = ours_to_hf(state, family, ckpt.config)
    # The chat template and turn-end ids travel along (export_chat_files); a Hugging Face directory
    # exported as it is keeps its own side files byte for byte, and weights without a tokenizer
    # get none of them.
    has_tokenizer = not isinstance(ckpt.tokenizer, MissingTokenizer)
    chat = export_chat_files(ckpt) if has_tokenizer else {}
    source = Path(ckpt.path)
    with atomic_dir(out) as tmp:
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", FAMILIES[family].config_out(ckpt.config, ckpt.tokenizer.special_tokens))
        if has_tokenizer:
            write_json(tmp / "tokenizer.json", to_hf_json(ckpt.tokenizer))
        for name in SIDE_FILES:
            if (source / name).is_file() and (name not in chat or is_hf_dir(source)):
                (tmp / name).write_bytes((source / name).read_bytes())
            elif name in chat:
                write_json(tmp / name, chat[name])


def download_hf(spec: str) -> Path:
    """``hf:ORG/NAME[@REVISION]``: fetch the model's config, safetensors and tokenizer files from
    the Hugging Face Hub into its cache (online only) and return the local directory."""
    repo, _, revision = spec[len("hf:"):].partition("@")
    if repo.count("/") != 1:
        raise UserError(f"{spec!r}: expected hf:ORG/NAME, for example hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("hf:ORG/NAME needs the huggingface_hub package: pip install \"gptlab[hf]\"") from None
    patterns = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
    except Exception as e:  # the hub raises many types (offline, not found, gated)
        raise UserError(f"could not download {repo} from the Hugging Face Hub ({type(e).__name__}); check the "
                        "name and the network, or download it yourself and give the directory") from None
