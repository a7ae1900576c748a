"""Int8 weight-only quantisation: a model's Linear weights stored in a quarter of the memory.

Each row of a Linear weight W (out, in), the weights of one output channel, is stored as int8
numbers q and one float scale s, symmetric around zero:

    s = max_j |W[i, j]| / 127        q[i, j] = round(W[i, j] / s)  in [-127, 127]

so W[i, j] is known to within s / 2, half a step of its own row's grid. A scale per output
channel (not one per matrix) keeps a row of small weights from being flattened onto a grid
sized for another row's outliers. Activations stay in floating point ("weight-only"): the
forward pass multiplies by the int8 weights turned back into floats, and scales the result,
x W^T = (x q^T) * s, since s is constant along each output.

What is quantised: every ``nn.Linear`` inside the blocks (q/k/v/o projections and the MLP),
and the output head unless it is tied to the token embedding. Embeddings and norms are not: a
lookup reads one row per token, so the table's size costs memory but no time, and norms are a
few thousand numbers. A tied head (SmolLM2's) is left float by default because quantising it
means an int8 copy next to the float table that lookups still need: more memory, and, as the
dequantised head is rebuilt at every step, slower decoding (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import UserError

#: the largest int8 magnitude used; -128 is left out so the grid is symmetric
QMAX = 127


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (out, in) float -> q (out, in) int8, scale (out,) float32,
    with weight ~= q * scale[:, None] to within scale / 2 per element."""
    w = weight.detach().float()
    # An all-zero row gets scale 1 (its q is all zero anyway) rather than 0 / 0.
    scale = w.abs().amax(dim=1) / QMAX  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """A Linear layer whose weight is int8 with one scale per output channel (see the module).

    ``weight`` (out, in) int8 and ``scale`` (out,) float32 are buffers, not parameters: they are
    not trained. The bias, if any, stays a float parameter.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for, (out, in) float32."""
        return self.weight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out). Dequantising the whole matrix and scaling the output is
        # exact (x q^T) * s and runs on every device; torch's fused int8 weight-only kernel
        # (aten._weight_int8pack_mm) is slower than this on AVX2 CPUs (benchmarks/RESULTS.md).
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, bias={self.bias is not None}"


def quantize_int8(model: nn.Module, head: bool | None = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` in ``model.layers`` (and ``model.lm_head`` when
    ``head``; by default when it is not tied to the embedding) by a ``QuantLinear``; return the
    model. Embeddings and norms stay as they are.

    LoRA layers (subclasses of nn.Linear) are refused: merge the adapter first.
    """
    if not hasattr(model, "layers") or not hasattr(model, "lm_head"):
        raise UserError(f"int8 quantisation needs a GPT with blocks and an output head, not a {type(model).__name__}")
    targets = [(parent, name, child) for parent in model.layers.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if head is None:
        head = model.lm_head.weight is not model.embed_tokens.weight
    if head:
        targets.append((model, "lm_head", model.lm_head))
    for _, name, linear in targets:  # all checked before any is replaced
        if type(linear) is not nn.Linear:
            raise UserError(f"{name} is a {type(linear).__name__}, which int8 quantisation does not handle; "
                            "merge the LoRA adapter first (gptlab merge)")
    for parent, name, linear in targets:
        setattr(parent, name, QuantLinear.from_linear(linear))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each tensor counted once (a tied head
    is the embedding). Position tables (RoPE's cos and sin) are buffers too, and counted."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())
