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
ARCHS = ("gpt2", "llama", "qwen2", "mistral", "gemma3", "bigram")
# "sdpa": PyTorch's fused scaled_dot_product_attention (fast, never materialises the weights).
# "reference": the textbook softmax(QK^T / sqrt(d)) with an explicit causal mask (readable,
# can hand back the attention weights for visualisation).
ATTN_IMPLS = ("sdpa", "reference")
POS_EMBEDDINGS = ("learned", "rope", "sinusoidal", "alibi")
NORMS = ("layernorm", "rmsnorm", "rmsnorm_offset")
MLPS = ("gelu", "swiglu", "geglu", "relu2")
# The norms that divide by the root mean square only; a learned QK-norm is one of them.
RMS_NORMS = ("rmsnorm", "rmsnorm_offset")
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
    # Gemma 3 (text): five local layers (a 512-token window, RoPE base 10,000) per global one
    # (base 1,000,000); embeddings scaled by sqrt(C); zero-centred RMSNorms (scale 1 + w) before
    # and after each branch; learned QK-norm; a GeGLU MLP; a tied head. Its heads are wider than
    # n_embd // n_head (the 270M: 4 heads of 256 in a 640-wide stream), so presets set head_dim.
    "gemma3": {
        "arch": "gemma3", "pos_embedding": "rope", "norm": "rmsnorm_offset", "norm_eps": 1e-6,
        "mlp": "geglu", "bias": False, "qkv_bias": None, "tie_embeddings": True,
        "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 512,
        "layer_pattern": "LLLLLG", "rope_local_theta": 10000.0, "embed_scale": True,
        "sandwich_norm": True, "learned_qk_norm": True,
    },
}  # fmt: skip


class _HeadDim:
    """The ``head_dim`` field of ``ModelConfig``: it is set to a width or None, and read as the
    width the heads have, n_embd // n_head when it was set to None. So every user of
    ``config.head_dim`` gets a number, while the config (and its JSON) keeps the None that lets
    the width follow n_embd and n_head. The value as set lives in ``_head_dim``.

    ``dataclasses.replace`` copies fields as read, so ``replace(config, n_embd=...)`` keeps the
    old width; pass ``head_dim=None`` along to let it follow the new shape."""

    def __get__(self, config: ModelConfig | None, owner: type | None = None) -> Any:
        if config is None:
            return None  # the field's default, as the dataclass asks for it
        explicit = config.__dict__.get("_head_dim")
        if explicit is not None or not (is_int(config.n_head) and config.n_head > 0 and is_int(config.n_embd)):
            return explicit  # an invalid n_head leaves nothing to derive; validation reports it
        return config.n_embd // config.n_head

    def __set__(self, config: ModelConfig, value: int | None) -> None:
        config.__dict__["_head_dim"] = value


@dataclass
class ModelConfig(Settings):
    """Hyper-parameters of a decoder-only Transformer. Defaults are GPT-2 small (124M).

    Llama, Qwen2, Mistral and Gemma 3 are the same Transformer with other options (RoPE,
    RMSNorm, SwiGLU, grouped-query attention, q/k/v biases, a sliding window; Gemma's local and
    global layers, sandwich norms, QK-norm, GeGLU, wide heads, scaled embeddings, soft caps);
    ``for_family`` fills them in. The defaults of those options are GPT-2's, so older configs
    load unchanged.
    """

    WHAT = "model config"

    vocab_size: int = 50257
    """Number of token ids the embedding and the output head cover."""
    block_size: int = 1024
    """Context length: the most tokens the model sees at once (rows of the position table)."""
    n_layer: int = 12
    """Number of Transformer blocks stacked on top of each other."""
    n_head: int = 12
    """Attention heads per block; each head works in head_dim dimensions."""
    n_embd: int = 768
    """Width of the residual stream (the embedding size); must be divisible by n_head unless
    head_dim is set."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention probabilities and residual outputs.
    0 for pretraining on plenty of data; 0.1-0.2 helps small models on small corpora."""
    bias: bool = True
    """Whether Linear layers and LayerNorms carry a bias (GPT-2 does; newer models don't)."""
    tie_embeddings: bool = True
    """Whether the output head reuses the token-embedding matrix (as GPT-2 does)."""
    arch: str = "gpt2"
    """Family name ("gpt2", "llama", "qwen2", "mistral", "gemma3") for naming, reporting and presets.
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
    """Normalisation: "layernorm" (subtract the mean, divide by the std; GPT-2), "rmsnorm"
    (divide by the root mean square only, no bias; Llama) or "rmsnorm_offset" (Gemma's RMSNorm:
    the scale is 1 + weight, so a weight of 0 is the identity and weight decay pulls the scale
    towards 1, not 0; computed in float32 to the end)."""
    norm_eps: float = 1e-5
    """Added to the variance inside every norm so that it never divides by zero."""
    mlp: str = "gelu"
    """Feed-forward network: "gelu" is down(gelu(up(x))) (GPT-2); "swiglu" is
    down(silu(gate(x)) * up(x)) (Llama), a learned gate on each hidden unit; "geglu" is
    down(gelu(gate(x)) * up(x)) with the tanh GELU (Gemma), the same gate with another curve;
    "relu2" is down(relu(up(x))^2) (Primer; the nanoGPT speedruns), cheap and sparse."""
    intermediate_size: int | None = None
    """Hidden width of the MLP. None: 4 * n_embd for gelu and relu2; for the gated swiglu and
    geglu 8/3 * n_embd rounded up to a multiple of 64, so their three matrices hold about as
    much as gelu's two."""
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
    learned_qk_norm: bool = False
    """The same normalisation of each head's queries and keys (before RoPE), with a learned
    scale per dimension: ``self_attn.q_norm`` and ``k_norm``, norms of the ``norm`` kind (an
    RMS one) over head_dim (Gemma 3). Excludes ``qk_norm``."""
    zero_init_residual: bool = False
    """Start o_proj and down_proj at zero, so every block starts as the identity and the model
    as a bigram model (the speedruns' choice), instead of GPT-2's small scaled normal."""
    sliding_window: int | None = None
    """If set, each token of a local layer attends to at most this many most recent tokens
    (itself included); None: to every earlier token. Without ``layer_pattern`` every layer is
    local when it is set (Mistral)."""
    layer_pattern: str | None = None
    """Which layers are local ("L": they see only the last sliding_window tokens) and which
    global ("G": every earlier token), as a string repeated over the layers from the first and
    cut at n_layer: "LLLLLG" is Gemma 3's five local layers per global one, "LG" Gemma 2's
    alternation. Local layers keep attention cheap on long contexts; the global ones still
    carry information from anywhere. None: every layer local if sliding_window is set, else
    global."""
    rope_local_theta: float | None = None
    """RoPE base of the local layers, which then rotate without ``rope_scaling`` (Gemma 3:
    10,000 for local layers, 1,000,000 and any scaling for global ones: a short window needs
    no long wavelengths). None: local layers rotate as the global ones do."""
    head_dim: int | None = _HeadDim()  # type: ignore[assignment]
    """Width of one attention head. None: n_embd // n_head. Set, the heads are that wide
    whatever n_embd is: q_proj maps n_embd to n_head * head_dim and o_proj back (Gemma 3 270M:
    4 heads of 256 in a 640-wide stream). Read, it is always the width in use."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(n_embd) (rounded to the model's dtype) before the
    first block, as Gemma does: its embedding is also its tied output head, whose rows stay
    small, and the scale brings the inputs to the size the residual stream works at."""
    sandwich_norm: bool = False
    """Normalise each branch's output too, before it joins the residual stream:
    x + norm(attn(norm(x))), then x + norm(mlp(norm(x))) (Gemma 2 and 3). A block then has
    four norms: ``input_layernorm``, ``post_attention_layernorm`` (here on the attention's
    output), ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``. No branch can
    then add more than a norm's scale to the stream, which keeps deep stacks stable."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are divided by the square root of this instead of head_dim (Gemma's
    name for it); None: head_dim, the usual 1 / sqrt(D)."""
    attn_logit_softcapping: float | None = None
    """If set, every attention score s becomes cap * tanh(s / cap) before the mask and softmax
    (Gemma 2): smooth below the cap, never above it. SDPA cannot do this, so such a model
    always takes the explicit attention path."""
    final_logit_softcapping: float | None = None
    """If set, the output logits z become cap * tanh(z / cap) (Gemma 2): no logit grows past
    the cap, however confident the model."""

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
        if self.mlp in ("swiglu", "geglu"):
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    def layer_kind(self, layer: int) -> str:
        """"local" if layer ``layer`` sees only the last sliding_window tokens, else "global"."""
        if self.layer_pattern is None:
            return "global" if self.sliding_window is None else "local"
        return "local" if self.layer_pattern[layer % len(self.layer_pattern)] == "L" else "global"

    @property
    def attention_kinds(self) -> tuple[str, ...]:
        """The kinds of layer this model has, ("global",), ("local",) or both: one attention
        mask (and with ``rope_local_theta`` one RoPE table) is made per kind."""
        kinds = {self.layer_kind(i) for i in range(self.n_layer)}
        return tuple(kind for kind in ("global", "local") if kind in kinds)

    def window(self, kind: str) -> int | None:
        """How many recent tokens a layer of ``kind`` sees: sliding_window if local, else all."""
        return self.sliding_window if kind == "local" else None

    def to_dict(self) -> dict[str, Any]:
        # head_dim as it was set (None follows n_embd // n_head), not the width it reads as.
        return {**super().to_dict(), "head_dim": self.__dict__.get("_head_dim")}

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
        explicit_head_dim = self.__dict__.get("_head_dim")
        p.must(explicit_head_dim is None or (is_int(explicit_head_dim) and explicit_head_dim > 0),
               "head_dim", "a positive whole number or null (n_embd // n_head)")
        p.add(explicit_head_dim is not None or not (n_head_ok and n_embd_ok) or self.n_embd % self.n_head == 0,
              f"{p.said('n_embd')} must be divisible by {p.said('n_head')} (or set {p.spell('head_dim')})")
        p.within("dropout", 0.0, 1.0)
        p.boolean("bias", "tie_embeddings", "learned_qk_norm", "embed_scale", "sandwich_norm")
        p.boolean("qkv_bias", optional=True)
        for name, choices in (("arch", ARCHS), ("attn_impl", ATTN_IMPLS),
                              ("pos_embedding", POS_EMBEDDINGS), ("norm", NORMS), ("mlp", MLPS)):
            p.choice(name, choices)
        p.positive("rope_theta", "norm_eps")
        p.positive("rope_local_theta", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                   optional=True)
        p.whole("intermediate_size", "n_kv_head", "sliding_window", optional=True)
        kv_ok = is_int(self.n_kv_head) and self.n_kv_head > 0
        p.add(not (n_head_ok and kv_ok) or self.n_head % self.n_kv_head == 0,
              f"{p.said('n_head')} must be divisible by {p.said('n_kv_head')}")
        head_dim = self.head_dim if is_int(self.head_dim) and self.head_dim > 0 else None
        # RoPE rotates pairs of dimensions, so a head needs an even width.
        derived = f"{p.said('n_embd')} // {p.said('n_head')} = " if explicit_head_dim is None else "head_dim="
        p.add(not (self.pos_embedding == "rope" and head_dim is not None and head_dim % 2),
              f"pos_embedding='rope' needs an even head_dim, got {derived}{head_dim}")
        p.add(not (self.pos_embedding == "sinusoidal" and n_embd_ok and self.n_embd % 2),
              f"pos_embedding='sinusoidal' needs an even {p.said('n_embd')} (sin/cos pairs)")
        p.add(not (self.arch == "bigram" and self.tie_embeddings is True),
              f"arch='bigram' has no output head to tie to its table; set {p.spell('tie_embeddings')} to false")
        self._gemma_option_problems(p)
        p.found += self._rope_scaling_problems()

    def _gemma_option_problems(self, p: Problems) -> None:
        """The rules between the options Gemma brought: the QK-norms, the layer pattern, the
        local RoPE base and the embedding scale."""
        p.add(not (self.qk_norm is True and self.learned_qk_norm is True),
              f"{p.spell('qk_norm')} and {p.spell('learned_qk_norm')} exclude each other; choose one")
        p.add(not (self.learned_qk_norm is True and self.norm in NORMS and self.norm not in RMS_NORMS),
              f"{p.spell('learned_qk_norm')} needs an RMS norm ({', '.join(RMS_NORMS)}), got {p.said('norm')}")
        pattern = self.layer_pattern
        if p.must(pattern is None or (isinstance(pattern, str) and pattern != "" and set(pattern) <= {"L", "G"}),
                  "layer_pattern", 'null or a string of L (local) and G (global), such as "LLLLLG"'):
            p.add(pattern is None or "L" not in pattern or self.sliding_window is not None,
                  f"{p.said('layer_pattern')} has local layers (L) but {p.spell('sliding_window')} is not set")
        p.add(self.rope_local_theta is None or self.pos_embedding == "rope",
              f"{p.spell('rope_local_theta')} needs pos_embedding='rope', got {p.said('pos_embedding')}")
        p.add(not (self.embed_scale is True and self.pos_embedding == "sinusoidal"),
              f"{p.spell('embed_scale')} with pos_embedding='sinusoidal' would scale twice: the sinusoidal "
              "encoding already scales the embeddings by sqrt(n_embd)")

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
