"""Int8 quantisation for fast CPU decoding: int8 weights, int8 activations, int32 sums.

Decoding one token reads every weight once and does two operations with each, so its speed is
the speed at which the weights stream from memory. Int8 weights are a quarter of float32's
bytes; and multiplying int8 by int8 into int32 sums (fbgemm's kernels, the ones PyTorch's
dynamic quantisation runs on x86 CPUs, AVX2 and AVX-512 alike) skips turning the weights back
into floats, which costs more than it saves (benchmarks/RESULTS.md, "int8 on the CPU").

Weights, once, per output channel: each row of a Linear weight W (out, in) is stored as int8
numbers q and one float scale s, symmetric around zero,

    s = max_j |W[i, j]| / 127        q[i, j] = round(W[i, j] / s)  in [-127, 127]

so W[i, j] is known to within s / 2, half a step of its own row's grid. A scale per row (not
one per matrix) keeps a row of small weights from being flattened onto a grid sized for
another row's outliers.

Activations, at every call, per token: fbgemm rounds its whole input to 8 bits with one scale,
so a single token with large activations (language models have a few, often the first token
of a text) would flatten every other token of a prompt onto its coarse grid: measured on
SmolLM2, that nearly triples perplexity. So each token's row x is first divided by its own
largest magnitude a = max |x|; every row then spans [-1, 1] and gets a grid of its own, and
since a Linear is linear in its input, multiplying the output row by a undoes the division
exactly: W x = a W (x / a). The bias is added after.

What is quantised: every ``nn.Linear`` in the blocks (q/k/v/o projections and the MLP) and the
output head. A tied head (the token embedding, SmolLM2's) gets an int8 copy beside the float
table that lookups still read: a quarter more memory for the head, and the largest matrix of a
small model read at a quarter of the bytes at every token. Embeddings and norms stay float.
"""

from __future__ import annotations

import functools
import warnings

import torch
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


@functools.lru_cache(maxsize=None)
def reduce_range() -> bool:
    """Whether activations must use 7 bits instead of 8. Without VNNI instructions (most AVX2
    CPUs) fbgemm adds pairs of uint8 x int8 products in 16 bits, which 8-bit activations can
    overflow (2 x 255 x 127 > 32767); with VNNI (AVX-512 VNNI, AVX-VNNI) the sums are 32-bit."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (probe is not None and probe())


def _int8_matmul(rows: torch.Tensor, packed: torch.ScriptObject, levels: int) -> torch.Tensor:
    """rows (M, in) float32 within [-1, 1] times the packed int8 weight: (M, out) float32.

    Each value is rounded to the nearest of ``levels`` + 1 evenly spaced points from -1 to 1
    (uint8 with the zero point in the middle), the products summed in int32 and the sums
    scaled back by the two grids' steps. The grid is fixed, not drawn from the input's own
    range as fbgemm's dynamic quantisation draws it, so a row gives the same output whatever
    rows share its call: a batch equals its prompts run one at a time, a prefill equals its
    tokens decoded one by one.
    """
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, 2.0 / levels, levels // 2, packed)


class Int8Linear(nn.Module):
    """A Linear layer computed in int8 (see the module): weights per output channel, each input
    row rounded to 8 bits on its own grid at every call.

    The weights live in fbgemm's packed form (not a parameter or buffer: they are not trained
    and do not move between devices); ``int8_weight`` and ``dequantized_weight`` unpack them.
    The bias, if any, stays a float parameter.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 marks quantised tensors deprecated; the packed kernels are not (yet).
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero_points, 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self._levels = 126 if reduce_range() else 254  # steps of the activations' grid over [-1, 1]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (out, in) int8, scale (out,) float32), unpacked from fbgemm's layout."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for, (out, in) float32."""
        q, scale = self.int8_weight()
        return q.float() * scale[:, None]

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 weights and their scales (the bias is a parameter, counted there)."""
        return self.out_features * (self.in_features + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out), in x's dtype; fbgemm takes and gives float32 rows.
        rows = x.reshape(-1, self.in_features).float()
        peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        y = _int8_matmul(rows / peak, self._packed, self._levels) * peak
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, bias={self.bias is not None}"


def int8_problem(model: nn.Module) -> str | None:
    """Why int8 cannot run for ``model`` here, in one line naming what to use instead, or None."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return (f"--quantize int8 runs on the CPU (fbgemm's int8 kernels), not on {device.type}; "
                "there, --dtype bf16 halves the weights instead")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return ("--quantize int8 needs fbgemm's int8 kernels (x86 CPUs), which this PyTorch lacks; "
                "use --dtype bf16 to halve the weights instead")
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` in ``model.layers`` and the output head by an
    ``Int8Linear``; return the model. Embeddings and norms stay as they are.

    LoRA layers (subclasses of nn.Linear) are refused: merge the adapter first.
    """
    if not hasattr(model, "layers") or not hasattr(model, "lm_head"):
        raise UserError(f"int8 quantisation needs a GPT with blocks and an output head, not a {type(model).__name__}")
    problem = int8_problem(model)
    if problem:
        raise UserError(problem)
    targets = [(parent, name, child) for parent in model.layers.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    targets.append((model, "lm_head", model.lm_head))
    for _, name, linear in targets:  # all checked before any is replaced
        if type(linear) is not nn.Linear:
            raise UserError(f"{name} is a {type(linear).__name__}, which int8 quantisation does not handle; "
                            "merge the LoRA adapter first (gptlab merge)")
    for parent, name, linear in targets:
        setattr(parent, name, Int8Linear.from_linear(linear))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and int8 weights, each tensor counted once
    (a tied head is the embedding, unless quantised). Position tables (RoPE's cos and sin) are
    buffers too, and counted."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) + sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))
