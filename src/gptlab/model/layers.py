"""Building blocks of the Transformer: normalisation, causal self-attention, the MLP.

Shapes use B = batch, T = sequence length, C = n_embd, H = n_head, D = head_dim = C // H.
Modules here only declare their parameters; ``GPT.init_weights`` gives them their values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.model.config import ModelConfig


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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions.

    All heads run in one batched matmul: the (B, T, C) projections are viewed as (B, H, T, D).
    ``attn_impl`` ("sdpa" or "reference", from the config) may be changed on the module at any
    time. Setting ``save_weights = True`` makes every forward pass store the attention
    probabilities in ``attn_weights`` (B, H, T, T); that needs the reference path, so it is
    used whatever ``attn_impl`` says while ``save_weights`` is on.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.attn_impl = config.attn_impl
        self.save_weights = False
        self.attn_weights: torch.Tensor | None = None
        C = config.n_embd
        # Separate projections (not one fused c_attn as in GPT-2's files) so the names match
        # the Llama tree and grouped-query attention can later give k/v fewer heads.
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.o_proj = nn.Linear(C, C, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, H, T, D): heads become a batch dimension.
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.attn_impl == "sdpa" and not self.save_weights:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            y = self._reference_attention(q, k, v)
        # (B, H, T, D) -> (B, T, C): concatenate the heads again.
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.o_proj(y))

    def _reference_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """softmax(Q K^T / sqrt(D) + causal mask) V, written out; q, k, v are (B, H, T, D)."""
        T = q.size(-2)
        # (B, H, T, T): how much query position i attends to key position j. Scaling by
        # 1/sqrt(D) keeps the scores' variance near 1 so the softmax does not saturate.
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        # Position i may look at j <= i only: the upper triangle is set to -inf, which the
        # softmax turns into probability 0.
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        # Softmax in float32: under bf16 autocast its sums would otherwise lose precision.
        probs = F.softmax(scores.float(), dim=-1).to(v.dtype)
        if self.save_weights:
            self.attn_weights = probs.detach()
        return self.attn_dropout(probs) @ v  # (B, H, T, D)


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C -> GELU -> C, applied to every token alone."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.up_proj = nn.Linear(C, 4 * C, bias=config.bias)
        self.down_proj = nn.Linear(4 * C, C, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU; imported weights expect it.
        h = F.gelu(self.up_proj(x), approximate="tanh")  # (B, T, 4C)
        return self.dropout(self.down_proj(h))  # (B, T, C)
