"""The shape of a model: one typed dataclass, checked in one place, saved as JSON.

A checkpoint's ``config.json`` is ``ModelConfig.to_dict()``; loading it back goes through
``ModelConfig.from_dict``, which refuses keys it does not know so that a typo in a config file
is reported instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptlab.errors import UserError

# Architectures the model implements. Later options (RoPE, RMSNorm, SwiGLU, grouped-query
# attention) become values here or fields below, all served by the same GPT class.
ARCHS = ("gpt2",)
# "sdpa": PyTorch's fused scaled_dot_product_attention (fast, never materialises the weights).
# "reference": the textbook softmax(QK^T / sqrt(d)) with an explicit causal mask (readable,
# can hand back the attention weights for visualisation).
ATTN_IMPLS = ("sdpa", "reference")


@dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only Transformer. Defaults are GPT-2 small (124M)."""

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
    """Architecture family; only "gpt2" for now."""
    attn_impl: str = "sdpa"
    """How attention is computed: "sdpa" (fused, fast) or "reference" (explicit, inspectable).
    Both give the same result; the choice does not change the weights."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ``UserError`` naming every bad field at once; return None if all are fine."""
        problems = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            # bool is a subclass of int; `n_layer=True` is a mistake, not 1.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        n_head_ok = isinstance(self.n_head, int) and self.n_head > 0
        if n_head_ok and isinstance(self.n_embd, int) and self.n_embd % self.n_head != 0:
            problems.append(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (
            not isinstance(self.dropout, (int, float))
            or isinstance(self.dropout, bool)
            or not 0.0 <= self.dropout < 1.0
        ):
            problems.append(f"dropout={self.dropout!r} must be in [0, 1)")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be true or false")
        if self.arch not in ARCHS:
            problems.append(f"arch={self.arch!r} must be one of {', '.join(ARCHS)}")
        if self.attn_impl not in ATTN_IMPLS:
            problems.append(f"attn_impl={self.attn_impl!r} must be one of {', '.join(ATTN_IMPLS)}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build and validate a config; missing keys take defaults, unknown keys are an error."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise UserError(
                f"unknown model config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
            )
        config = cls(**d)
        config.validate()
        return config
