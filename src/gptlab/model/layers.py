"""Building blocks of the Transformer: norms, positions (rotary, sinusoidal, ALiBi), causal
self-attention, MLPs.

Shapes use B = batch, T = new tokens, S = tokens attended to (T, or cached + T with a KV
cache), C = n_embd, H = n_head, K = n_kv_head, D = head_dim (C // H unless the config sets it).
Modules here only declare their parameters; ``GPT.init_weights`` gives them their values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.model.config import ModelConfig
from gptlab.model.kv_cache import KVCache

# --- normalisation ---------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dimension.

    Each token's vector is rescaled to zero mean and unit variance, then given a learned scale
    and (optionally) shift. ``F.layer_norm`` computes exactly this in one fused kernel.
    """

    def __init__(self, dim: int, bias: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension (Llama's norm).

    LayerNorm without the mean subtraction and the bias: only the vector's scale is
    normalised, which is cheaper and trains as well. Computed in float32 and cast back before
    the weight, in the same order as Hugging Face, so imported models match it bit for bit.

    With ``unit_offset`` (Gemma's norm) the scale is 1 + weight, and the product is taken in
    float32 too before the cast, again as Hugging Face's Gemma does: a weight of 0 is the
    identity, which is how ``GPT.init_weights`` starts it and how Gemma's files store it.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm without a weight is the float32 normalisation in one kernel (half the
        # time of pow, mean, rsqrt, mul spelled out, the same values).
        x32 = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        if self.unit_offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> LayerNorm | RMSNorm:
    """The norm ``config.norm`` asks for, over ``dim`` features (default the residual width C)."""
    dim = config.n_embd if dim is None else dim
    if config.norm in ("rmsnorm", "rmsnorm_offset"):
        return RMSNorm(dim, eps=config.norm_eps, unit_offset=config.norm == "rmsnorm_offset")
    return LayerNorm(dim, bias=config.bias, eps=config.norm_eps)


# --- fixed position encodings: sinusoidal and ALiBi -----------------------------------------


def sinusoidal_positions(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed position encoding of "Attention Is All You Need", (n_positions, dim) float32.

    PE[p, 2i] = sin(p / 10000^(2i / dim)) and PE[p, 2i + 1] = cos(p / 10000^(2i / dim)), for an
    even ``dim``: each pair of dimensions turns at its own speed, from once every 2 pi tokens to
    once every 10000 * 2 pi, so every position gets a distinct pattern, and PE[p + k] is a fixed
    rotation of PE[p], which lets attention read relative offsets.
    """
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    table = torch.empty(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes, (n_head,) float32 (Press et al. 2022, "Train Short, Test Long").

    For n heads, a power of two, head h (from 1) gets 2^(-8h / n): a geometric sequence from
    nearly 1/2 down to 1/256, so some heads look far back and others only at recent tokens.
    Otherwise the paper takes the slopes of the nearest power of two below, then every other
    slope of twice that many heads until there are n.
    """
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    below = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(below) + power_of_two(2 * below)[0::2][: n_head - below]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, mask: torch.Tensor, first_query: int | None = None) -> torch.Tensor:
    """Additive attention scores for ALiBi: -slope * distance where ``mask`` allows, else -inf.

    ``mask`` is (T, S) or (B, 1, T, S) bool from ``attention_mask``, whose queries are the last
    T of the S positions (or start at ``first_query``, as there); the result is (H, T, S) or (B, H, T, S) float32, added to Q K^T /
    sqrt(D) before the softmax. Nothing is added to the tokens: a query at distance d from a
    key simply scores it slope * d lower, so attention fades with distance at a rate per head.
    """
    T, S = mask.shape[-2:]
    first_query = S - T if first_query is None else first_query
    q_pos = torch.arange(first_query, first_query + T, device=mask.device)[:, None]  # (T, 1)
    distance = (q_pos - torch.arange(S, device=mask.device)[None, :]).float()  # (T, S)
    bias = -slopes.to(mask.device)[:, None, None] * distance  # (H, T, S)
    return bias.masked_fill(~mask, float("-inf"))


# --- rotary position embeddings (RoPE) -------------------------------------------------------


def rope_inv_freq(config: ModelConfig, kind: str = "global") -> tuple[torch.Tensor, float]:
    """Angular speed of each rotated pair, (D // 2,) float32, and the factor for cos and sin,
    for the layers of ``kind`` ("global", or "local": see ``rope_local_theta``).

    Pair i of a head turns by position * inv_freq[i] with inv_freq[i] = theta^(-2i / D): the
    first pairs spin fast (local order), the last ones slowly (long range). ``rope_scaling``
    slows some of them down so a model trained on a short context reads a longer one; the
    three kinds compute exactly what Hugging Face's ``ROPE_INIT_FUNCTIONS`` do.
    """
    own_local = kind == "local" and config.rope_local_theta is not None
    D, base = config.head_dim, config.rope_local_theta if own_local else config.rope_theta
    pos_freqs = base ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D)  # (D/2,)
    inv_freq = 1.0 / pos_freqs
    scaling = None if own_local else config.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        # Position interpolation: every pair turns `factor` times slower, so position
        # factor * p looks like position p did in training.
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    return _yarn_inv_freq(pos_freqs, scaling, D, base)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: slow down only the pairs whose wavelength is long compared to the context.

    Pairs with wavelength under original / high_freq_factor keep their speed (they never saw
    the context's end anyway); pairs over original / low_freq_factor turn `factor` times
    slower; in between, the two speeds are blended linearly in original / wavelength.
    """
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # (D/2,) tokens per full turn
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    slowed = torch.where(wavelen > original / low, inv_freq / factor, blended)
    return torch.where(wavelen < original / high, inv_freq, slowed)


def _yarn_inv_freq(
    pos_freqs: torch.Tensor, scaling: dict, D: int, base: float
) -> tuple[torch.Tensor, float]:
    """YaRN: keep fast pairs, interpolate slow ones, ramp between; sharpen attention a little.

    A pair that makes more than ``beta_fast`` turns over the original context keeps its speed
    (extrapolation); one making fewer than ``beta_slow`` turns is slowed by ``factor``
    (interpolation); pairs in between get a linear ramp over their index. Stretching the
    context flattens attention, so cos and sin are scaled up by the attention factor,
    0.1 * ln(factor) + 1 unless the config gives it.
    """
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor)
        if m and m_all:
            attention_factor = mscale(factor, m) / mscale(factor, m_all)

    def pair_index(turns: float) -> float:
        # The (fractional) pair index whose wavelength fits `turns` times into the context.
        return D * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = pair_index(scaling.get("beta_fast") or 32)
    high = pair_index(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # the ramp needs a non-zero width
    ramp = torch.clamp((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # (D/2,) 1: keep the original speed, 0: slow down by factor
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq, float(attention_factor)


def rope_tables(
    config: ModelConfig, n_positions: int, kind: str = "global"
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, each (n_positions, D) float32, for the layers of
    ``kind`` ("global" or "local").

    Split-halves layout (as Hugging Face): dimension j and j + D/2 form pair j, so the
    (T, D/2) angles are repeated once along the last dimension.
    """
    inv_freq, attention_factor = rope_inv_freq(config, kind)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90-degree turn of
    every pair (x1[j], x2[j])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of ``x`` (B, H, T, D) by its position's angle; cos, sin are (T, D), or
    (B, 1, T, D) when each sequence has positions of its own (left-padded batches).

    After rotation, q_m . k_n depends on the positions only through m - n, so attention
    sees relative distance without any position table.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# --- attention -------------------------------------------------------------------------------


def attention_mask(
    n_queries: int,
    n_keys: int,
    sliding_window: int | None,
    device: torch.device,
    real_keys: torch.Tensor | None = None,
    first_query: int | None = None,
) -> torch.Tensor:
    """Which keys each query may see, (n_queries, n_keys) bool, True = attend.

    The queries are the last ``n_queries`` of the ``n_keys`` positions (new tokens after the
    cached ones), so query i sits at position n_keys - n_queries + i; with ``first_query``
    (a static KV cache, whose later slots are not yet written) it sits at first_query + i.
    It sees keys at or before its position and, with a sliding window w, only the last w of
    them (itself included).

    ``real_keys`` (B, n_keys) bool, False at padding, gives a (B, 1, n_queries, n_keys) mask
    in which no query sees a padding key, except that a padding query still sees itself: a
    row with nothing to attend to would make softmax 0/0 = NaN, and the NaN would spread.
    """
    first_query = n_keys - n_queries if first_query is None else first_query
    q_pos = torch.arange(first_query, first_query + n_queries, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(n_keys, device=device)[None, :]  # (1, S)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    if real_keys is not None:
        mask = mask & (real_keys[:, None, None, :] | (k_pos == q_pos))  # (B, 1, Tq, S)
    return mask


def token_positions(
    first: int, n_tokens: int, real_tokens: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The positions of ``n_tokens`` new tokens after ``first`` earlier ones: first, first + 1,
    ... as (T,), shared by the batch; or, with ``real_tokens`` (B, first + T) bool, False at left
    padding, (B, T): the number of real tokens before each one (padding gets 0), so a padded
    sequence gets the positions it would have alone."""
    if real_tokens is None:
        return torch.arange(first, first + n_tokens, device=device)
    return (real_tokens.cumsum(-1) - 1).clamp(min=0)[:, first:]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K * n_rep, S, D): each k/v head serves n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, K, S, D = x.shape
    return x[:, :, None].expand(B, K, n_rep, S, D).reshape(B, K * n_rep, S, D)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions.

    All heads run in one batched matmul: the (B, T, H * D) projections are viewed as
    (B, H, T, D). With ``n_kv_head`` < ``n_head`` (grouped-query attention) keys and values
    have K heads, each shared by H // K query heads. ``attn_impl`` ("sdpa" or "reference", from
    the config) may be changed on the module at any time. Setting ``save_weights = True`` makes
    every forward pass store the attention probabilities in ``attn_weights`` (B, H, T, S); that
    needs the reference path, so it is used whatever ``attn_impl`` says while ``save_weights``
    is on, and so does a soft cap on the scores (``attn_logit_softcapping``), which SDPA lacks.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache is this layer's
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.qk_norm = config.qk_norm
        # Scores are scaled by 1/sqrt(D), or by Gemma's query_pre_attn_scalar ** -0.5 (spelled
        # as each reference spells it, so that the float is the same to the last bit).
        pre_attn = config.query_pre_attn_scalar
        self.scale = 1.0 / math.sqrt(self.head_dim) if pre_attn is None else pre_attn**-0.5
        self.softcap = config.attn_logit_softcapping
        self.save_weights = False
        self.attn_weights: torch.Tensor | None = None
        C, QD, KD = config.n_embd, config.n_head * config.head_dim, config.kv_heads * config.head_dim
        # Separate projections (not one fused c_attn as in GPT-2's files) so the names match
        # the Llama tree and k/v can have fewer heads than q. H * D is C unless head_dim is set.
        self.q_proj = nn.Linear(C, QD, bias=config.qkv_has_bias)
        self.k_proj = nn.Linear(C, KD, bias=config.qkv_has_bias)
        self.v_proj = nn.Linear(C, KD, bias=config.qkv_has_bias)
        self.o_proj = nn.Linear(QD, C, bias=config.bias)
        # A learned QK-norm: one scale per dimension of a head, shared by every head.
        learned = config.learned_qk_norm
        self.q_norm = make_norm(config, config.head_dim) if learned else None
        self.k_norm = make_norm(config, config.head_dim) if learned else None
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Attend from the tokens ``x`` (B, T, C) to themselves and any cached tokens.

        ``rope``: cos and sin (T, D) or (B, 1, T, D) of the new tokens' positions, or None for
        learned positions. ``mask``: (T, S) or (B, 1, T, S) bool from ``attention_mask``, or
        None when each query may see every key up to its own: T tokens among themselves
        (S == T, SDPA's fast is_causal path) or one new token after cached ones (T == 1); or a
        float mask, (H or B, H, T, S), added to the scores (-inf where a key is hidden; ALiBi).
        """
        B, T, _ = x.shape
        # (B, T, C) -> (B, H, T, D): heads become a batch dimension.
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            # Unit-RMS queries and keys: each score is then sqrt(D) times a cosine, never huge.
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # the same, with a learned scale
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            # Cached keys are stored rotated, so each is rotated once, at its own position.
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, S, D)
        n_rep = self.n_head // self.n_kv_head
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # SDPA wants an additive mask in the queries' dtype (bf16 under autocast)
        if self.attn_impl == "sdpa" and not self.save_weights and self.softcap is None:
            # enable_gqa lets each k/v head serve its n_rep query heads in place, without
            # copying the (B, K, S, D) cache n_rep times as repeat_kv does.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and T > 1, scale=self.scale, enable_gqa=n_rep > 1,
            )  # fmt: skip
        else:
            y = self._reference_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask)  # (B, H, S, D)
        # (B, H, T, D) -> (B, T, H * D): concatenate the heads again.
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))

    def _reference_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(Q K^T / sqrt(D) + mask) V, written out; q is (B, H, T, D), k, v (B, H, S, D)."""
        T, S = q.size(-2), k.size(-2)
        # (B, H, T, S): how much query i attends to key j. Scaling by 1/sqrt(D) keeps the
        # scores' variance near 1 so the softmax does not saturate.
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if self.softcap is not None:
            # cap * tanh(s / cap): about s while small, never beyond +-cap.
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            mask = attention_mask(T, S, None, q.device)
        if mask.is_floating_point():
            scores = scores + mask  # an additive mask holds -inf where a key is hidden
        else:
            # Keys a query may not see get -inf, which the softmax turns into probability 0.
            scores = scores.masked_fill(~mask, float("-inf"))
        # Softmax in float32: under bf16 autocast its sums would otherwise lose precision.
        probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
        if self.save_weights:
            self.attn_weights = probs.detach()
        return self.attn_dropout(probs) @ v  # (B, H, T, D)


# --- feed-forward ----------------------------------------------------------------------------


class MLP(nn.Module):
    """Position-wise feed-forward network, applied to every token alone: C -> hidden -> C.

    "gelu" (GPT-2): down(gelu(up(x))). "swiglu" (Llama): down(silu(gate(x)) * up(x)), where
    the gate decides, per token and hidden unit, how much of up(x) passes. "geglu" (Gemma):
    the same gate through the tanh GELU, down(gelu(gate(x)) * up(x)). "relu2":
    down(relu(up(x))^2), the squared ReLU of Primer (So et al., 2021).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, hidden = config.n_embd, config.mlp_hidden
        gated = config.mlp in ("swiglu", "geglu")
        self.gate_proj = nn.Linear(C, hidden, bias=config.bias) if gated else None
        self.up_proj = nn.Linear(C, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.kind = config.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 and Gemma were trained with the tanh approximation of GELU; their weights expect it.
        if self.kind == "relu2":
            h = F.relu(self.up_proj(x)).square()  # (B, T, hidden)
        elif self.kind == "gelu":
            h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, hidden)
        elif self.kind == "geglu":
            h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)  # (B, T, hidden)
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, hidden)
        return self.dropout(self.down_proj(h))  # (B, T, C)
