"""The shape of a model: one typed dataclass, checked in one place, saved as JSON.

A checkpoint's ``config.json`` is ``ModelConfig.to_dict()``; loading it back goes through
``ModelConfig.from_dict``, which refuses keys it does not know so that a typo in a config file
is reported instead of silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gptlab.errors import Problems, Settings, UserError, is_int, is_number, names

# Family names, used for naming, reporting and presets. What a Transformer computes comes from
# the explicit option fields below, never from this name; FAMILY_DEFAULTS gives each family's
# values. The one exception is "bigram", which is no Transformer: `build_model` makes the
# baseline lookup table (gptlab.model.bigram) from it, and it uses only vocab_size and block_size.
ARCHS = ("gpt2", "llama", "qwen2", "mistral", "bigram")
# "sdpa": PyTorch's fused scaled_dot_product_attention (fast, never materialises the weights).
# "reference": the textbook softmax(QK^T / sqrt(d)) with an explicit causal mask (readable,
# can hand back the attention weights for visualisation).
ATTN_IMPLS = ("sdpa", "reference")
POS_EMBEDDINGS = ("learned", "rope", "sinusoidal", "alibi")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
# RoPE scaling types and their keys (required, optional), as in Hugging Face configs.
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        (),
    ),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"),
    ),
}

# The option values that make each family; shapes (layers, widths, heads) are not options.
# `ModelConfig.for_family` and the presets start from these.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # GPT-2 (2019): learned positions, LayerNorm, GELU MLP, biases everywhere, tied head.
    "gpt2": {
        "arch": "gpt2", "pos_embedding": "learned", "norm": "layernorm", "norm_eps": 1e-5,
        "mlp": "gelu", "bias": True, "qkv_bias": None, "tie_embeddings": True,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": None,
    },
    # Llama 2/3, SmolLM: RoPE, RMSNorm, SwiGLU, no biases, separate head (SmolLM ties it).
    "llama": {
        "arch": "llama", "pos_embedding": "rope", "norm": "rmsnorm", "norm_eps": 1e-5,
        "mlp": "swiglu", "bias": False, "qkv_bias": None, "tie_embeddings": False,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": None,
    },
    # Qwen2 / Qwen2.5: Llama plus biases on q, k and v only; every release uses theta 1e6.
    "qwen2": {
        "arch": "qwen2", "pos_embedding": "rope", "norm": "rmsnorm", "norm_eps": 1e-6,
        "mlp": "swiglu", "bias": False, "qkv_bias": True, "tie_embeddings": False,
        "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": None,
    },
    # Mistral 7B v0.1: Llama plus sliding-window attention over the last 4096 tokens.
    "mistral": {
        "arch": "mistral", "pos_embedding": "rope", "norm": "rmsnorm", "norm_eps": 1e-5,
        "mlp": "swiglu", "bias": False, "qkv_bias": None, "tie_embeddings": False,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 4096,
    },
}  # fmt: skip


@dataclass
class ModelConfig(Settings):
    """Hyper-parameters of a decoder-only Transformer. Defaults are GPT-2 small (124M).

    Llama, Qwen2 and Mistral are the same Transformer with other options (RoPE, RMSNorm,
    SwiGLU, grouped-query attention, q/k/v biases, a sliding window); ``for_family`` fills
    them in. The defaults of those options are GPT-2's, so older configs load unchanged.
    """

    WHAT = "model config"

    vocab_size: int = 50257
    """Number of token ids the embedding and the output head cover."""
    block_size: int = 1024
    """Context length: the most tokens the model sees at once (rows of the position table)."""
    n_layer: int = 12
    """Number of Transformer blocks stacked on top of each other."""
    n_head: int = 12
    """Attention heads per block; each head works in n_embd // n_head dimensions."""
    n_embd: int = 768
    """Width of the residual stream (the embedding size); must be divisible by n_head."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention probabilities and residual outputs.
    0 for pretraining on plenty of data; 0.1-0.2 helps small models on small corpora."""
    bias: bool = True
    """Whether Linear layers and LayerNorms carry a bias (GPT-2 does; newer models don't)."""
    tie_embeddings: bool = True
    """Whether the output head reuses the token-embedding matrix (as GPT-2 does)."""
    arch: str = "gpt2"
    """Family name ("gpt2", "llama", "qwen2", "mistral") for naming, reporting and presets.
    It changes nothing by itself: the fields below say what the model computes. "bigram" is
    the exception: the baseline next-token lookup table, no Transformer at all."""
    attn_impl: str = "sdpa"
    """How attention is computed: "sdpa" (fused, fast) or "reference" (explicit, inspectable).
    Both give the same result; the choice does not change the weights."""
    pos_embedding: str = "learned"
    """How the model knows token order: "learned" adds a trained (block_size, C) table
    ``embed_positions`` to the token embeddings (GPT-2); "rope" rotates queries and keys by an
    angle proportional to their position (Llama), so attention scores depend on distance;
    "sinusoidal" adds the fixed sin/cos table of "Attention Is All You Need" (nothing learned);
    "alibi" adds nothing to the tokens and instead biases each head's attention scores by
    -slope * distance (Press et al. 2022), so a head's attention fades with distance."""
    rope_theta: float = 10000.0
    """RoPE base: pair i of a head rotates at angle position / theta^(2i / head_dim). A larger
    base makes the slowest pairs slower, so far-apart positions stay distinguishable."""
    rope_scaling: dict[str, Any] | None = None
    """Stretching RoPE beyond the trained context, as in Hugging Face configs:
    {"rope_type": "linear", "factor": f}; {"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
    {"rope_type": "yarn", "factor", "original_max_position_embeddings", optional
    "beta_fast" (32), "beta_slow" (1), "attention_factor", "mscale", "mscale_all_dim",
    "truncate" (true)}. None: plain RoPE."""
    norm: str = "layernorm"
    """Normalisation: "layernorm" (subtract the mean, divide by the std; GPT-2) or "rmsnorm"
    (divide by the root mean square only, no bias; Llama)."""
    norm_eps: float = 1e-5
    """Added to the variance inside every norm so that it never divides by zero."""
    mlp: str = "gelu"
    """Feed-forward network: "gelu" is down(gelu(up(x))) (GPT-2); "swiglu" is
    down(silu(gate(x)) * up(x)) (Llama), a learned gate on each hidden unit; "relu2" is
    down(relu(up(x))^2) (Primer; the nanoGPT speedruns), cheap and sparse."""
    intermediate_size: int | None = None
    """Hidden width of the MLP. None: 4 * n_embd for gelu; for swiglu 8/3 * n_embd rounded up
    to a multiple of 64, so its three matrices hold about as much as gelu's two."""
    n_kv_head: int | None = None
    """Key/value heads; None means n_head (multi-head attention). Fewer gives grouped-query
    attention (each k/v head serves n_head // n_kv_head query heads; 1 is multi-query), which
    shrinks the KV cache by that factor. Must divide n_head."""
    qkv_bias: bool | None = None
    """Whether q_proj, k_proj and v_proj carry biases; None follows ``bias``. Qwen2 has them
    while o_proj and the MLP have none."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys before their dot product (no learned scale),
    as the nanoGPT speedruns do: scores stay bounded, so higher learning rates stay stable."""
    zero_init_residual: bool = False
    """Start o_proj and down_proj at zero, so every block starts as the identity and the model
    as a bigram model (the speedruns' choice), instead of GPT-2's small scaled normal."""
    sliding_window: int | None = None
    """If set, each token attends to at most this many most recent tokens (itself included),
    as Mistral does; None: to every earlier token."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_head``, or ``n_head`` when that is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def qkv_has_bias(self) -> bool:
        """Whether q_proj, k_proj and v_proj carry biases."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the MLP (``intermediate_size`` or its default)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.mlp == "swiglu":
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @classmethod
    def for_family(cls, name: str, **overrides: Any) -> ModelConfig:
        """A validated config of family ``name`` (FAMILY_DEFAULTS), with ``overrides`` on top."""
        if name not in FAMILY_DEFAULTS:
            families = ", ".join(FAMILY_DEFAULTS)
            raise UserError(f"unknown model family {name!r}; families: {families}")
        config = cls(**{**FAMILY_DEFAULTS[name], **overrides})
        config.validate()
        return config

    def _check(self, p: Problems) -> None:
        p.whole("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        n_head_ok, n_embd_ok = is_int(self.n_head) and self.n_head > 0, is_int(self.n_embd) and self.n_embd > 0
        p.add(not (n_head_ok and n_embd_ok) or self.n_embd % self.n_head == 0,
              f"{p.said('n_embd')} must be divisible by {p.said('n_head')}")
        p.within("dropout", 0.0, 1.0)
        p.boolean("bias", "tie_embeddings")
        p.boolean("qkv_bias", optional=True)
        for name, choices in (("arch", ARCHS), ("attn_impl", ATTN_IMPLS),
                              ("pos_embedding", POS_EMBEDDINGS), ("norm", NORMS), ("mlp", MLPS)):
            p.choice(name, choices)
        p.positive("rope_theta", "norm_eps")
        p.whole("intermediate_size", "n_kv_head", "sliding_window", optional=True)
        kv_ok = is_int(self.n_kv_head) and self.n_kv_head > 0
        p.add(not (n_head_ok and kv_ok) or self.n_head % self.n_kv_head == 0,
              f"{p.said('n_head')} must be divisible by {p.said('n_kv_head')}")
        even_heads = n_head_ok and n_embd_ok and self.n_embd % self.n_head == 0
        # RoPE rotates pairs of dimensions, so a head needs an even width.
        p.add(not (self.pos_embedding == "rope" and even_heads and self.head_dim % 2),
              f"pos_embedding='rope' needs an even head_dim, got {p.said('n_embd')} // {p.said('n_head')} = "
              f"{self.head_dim if even_heads else '?'}")
        p.add(not (self.pos_embedding == "sinusoidal" and n_embd_ok and self.n_embd % 2),
              f"pos_embedding='sinusoidal' needs an even {p.said('n_embd')} (sin/cos pairs)")
        p.add(not (self.arch == "bigram" and self.tie_embeddings is True),
              f"arch='bigram' has no output head to tie to its table; set {p.spell('tie_embeddings')} to false")
        p.found += self._rope_scaling_problems()

    def _rope_scaling_problems(self) -> list[str]:
        scaling = self.rope_scaling
        if scaling is None:
            return []
        where = f"rope_scaling={scaling!r}"
        if not isinstance(scaling, dict) or scaling.get("rope_type") not in ROPE_SCALING_KEYS:
            return [f"{where} must be null or an object whose rope_type is one of "
                    f"{', '.join(ROPE_SCALING_KEYS)}"]
        if self.pos_embedding != "rope":
            return [f"{where} needs pos_embedding='rope'"]
        required, optional = ROPE_SCALING_KEYS[scaling["rope_type"]]
        takes = f"{scaling['rope_type']} takes {', '.join(required + optional)}"
        problems = []
        missing = [k for k in required if k not in scaling]
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}; {takes}")
        unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
        if unknown:
            problems.append(f"{where} has unknown keys {names(unknown)}; {takes}")
        for key, value in scaling.items():
            if key == "rope_type":
                continue
            if key == "truncate":
                ok = isinstance(value, bool)
            elif key in ("attention_factor", "mscale", "mscale_all_dim"):
                ok = value is None or is_number(value)
            else:
                ok = is_number(value) and value > 0
            if not ok:
                problems.append(f"rope_scaling[{key!r}]={value!r} is not a valid value")
        low, high = scaling.get("low_freq_factor"), scaling.get("high_freq_factor")
        if is_number(low) and is_number(high) and high <= low:
            problems.append(
                f"rope_scaling high_freq_factor={high} must exceed low_freq_factor={low}"
            )
        return problems
