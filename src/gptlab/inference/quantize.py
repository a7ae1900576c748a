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

Smoothing (SmoothQuant, Xiao et al., 2022), where a calibration text is given: a few input
channels of a layer are large in every token, so a token's grid, sized for them, is coarse for
all the others. Dividing input channel j by a factor s_j and multiplying the weights' column j
by it changes nothing in exact arithmetic (W x = (W diag(s)) (diag(s)^-1 x)), but with

    s_j = max |x_j| ** alpha / max_i |W[i, j]| ** (1 - alpha)      (alpha = 0.5)

the activations' large channels shrink and the weights take the difference, where each output
row has a grid of its own anyway. ``calibrate`` measures max |x_j| by running the model once on
``CALIBRATION_TEXT``.

What is quantised: every ``nn.Linear`` in the blocks (q/k/v/o projections and the MLP) and the
output head. A tied head (the token embedding, SmolLM2's) gets an int8 copy beside the float
table that lookups still read: a quarter more memory for the head, and the largest matrix of a
small model read at a quarter of the bytes at every token. Embeddings and norms stay float.

Layers that read the same input (q, k and v; a gated MLP's gate and up) are joined into one
int8 matrix, computed in one call and cut apart after (``Int8Slice``): the same numbers, since
each output row has its own scale and each token its own grid, in fewer calls. Decoding one
token is hundreds of small calls, and each costs time beyond its arithmetic.

That time is most of an int8 token's on a CPU without VNNI: the products are about a quarter
of it, the float work around them (norms, attention, each layer's scaling of its rows) and the
Python that calls it the rest. ``--compile`` beside ``--quantize int8``
(``gptlab.inference.compiled_decode``) removes most of it: the product is an operator of the
compiled graph (``gptlab::int8_product``) and everything else is fused around it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import warnings
import weakref

import torch
from torch import nn

from gptlab.errors import UserError
from gptlab.inference.calibration_text import CALIBRATION_TEXT

#: the largest int8 magnitude used; -128 is left out so the grid is symmetric
QMAX = 127
#: fbgemm's int8 product: float rows quantised with a given scale and zero point, times packed
#: int8 weights, float output
_QDQ_LINEAR = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
#: the smallest positive float32: an all-zero input row is divided by this, not by 0
TINY = torch.finfo(torch.float32).tiny
#: how far smoothing moves a channel's range from the activations to the weights (0: not at all)
ALPHA = 0.5


def smoothing_factors(input_peak: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s (in,) with s_j = max|x_j| ** alpha / max_i |W[i, j]| ** (1 - alpha) (see the module),
    kept within [1e-4, 1e4]; a channel never seen active (or a zero column) gets s = 1."""
    w_peak = weight.detach().abs().amax(dim=0).float()
    s = input_peak.float().pow(alpha) / w_peak.pow(1 - alpha)
    s = torch.where((input_peak > 0) & (w_peak > 0), s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


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
    """Whether the kernels can add only 7-bit activations. Without VNNI instructions (most AVX2
    CPUs) fbgemm adds pairs of uint8 x int8 products in 16 bits, which 8-bit activations can
    overflow (2 x 255 x 127 > 32767); with VNNI (AVX-512 VNNI, AVX-VNNI) the sums are 32-bit."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return not (probe is not None and probe())


def _int8_matmul(rows: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """rows (M, in) float32 within [-1, 1] times ``layer``'s packed int8 weight: (M, out) float32.

    Each value is rounded to the nearest multiple of 1/127 (255 points from -1 to 1), the
    products summed in int32 and the sums scaled back by the two grids' steps. The grid is
    fixed, not drawn from the input's own range as fbgemm's dynamic quantisation draws it, so a
    row gives the same output whatever rows share its call: a batch equals its prompts run one
    at a time, a prefill equals its tokens decoded one by one.

    With VNNI the rows go in as uint8 with the zero point at 127. Without it (``reduce_range``)
    a uint8 may only reach 127, which would halve the grid's steps; instead each row is split
    into its positive part and its negated negative part, x = max(x, 0) - max(-x, 0), both on
    0..127 with zero point 0, computed in one call of 2M rows and subtracted. The rounded values
    are the same, so AVX2 and AVX-512 machines compute the same products.

    These steps are plain tensor operations, which ``torch.compile`` fuses around the product;
    the product itself is ``_packed_product``.
    """
    if not layer._split_sign:
        return _packed_product(rows, layer, QMAX)
    halves = torch.cat((rows, rows.neg())).clamp_min_(0)  # (2M, in), within [0, 1]
    out = _packed_product(halves, layer, 0)
    return out[: len(rows)] - out[len(rows):]


#: every Int8Linear, by the key a compiled graph names it by (see ``_packed_product``)
_COMPILABLE: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _compilable(layer: Int8Linear) -> int:
    """A new key for ``layer`` in ``_COMPILABLE`` (held weakly: a layer let go leaves it)."""
    key = next(_KEYS)
    _COMPILABLE[key] = layer
    return key


# The operator a compiled graph calls for the product. Defined on a Library (not with
# torch.library.custom_op, whose Python wrapper cost 37 us a call here, the product itself 33).
_LIBRARY = torch.library.Library("gptlab", "DEF")
_LIBRARY.define("int8_product(Tensor rows, int key, int zero_point) -> Tensor")


@torch.library.impl(_LIBRARY, "int8_product", "CPU")
def _int8_product_op(rows: torch.Tensor, key: int, zero_point: int) -> torch.Tensor:
    return _QDQ_LINEAR(rows, 1.0 / QMAX, zero_point, _COMPILABLE[key]._packed)


@torch.library.register_fake("gptlab::int8_product")
def _(rows: torch.Tensor, key: int, zero_point: int) -> torch.Tensor:
    return rows.new_empty(rows.size(0), _COMPILABLE[key].out_features)


def _packed_product(rows: torch.Tensor, layer: Int8Linear, zero_point: int) -> torch.Tensor:
    """fbgemm's product of float rows, rounded on the grid of step 1/127 from ``zero_point``,
    and ``layer``'s packed weight: (M, out) float32. In a graph ``torch.compile`` builds, the
    product is an operator of its own (``gptlab::int8_product``) that names the layer by a key,
    since the compiler cannot hold fbgemm's packed weights; eager calls fbgemm directly."""
    if torch.compiler.is_compiling():
        return torch.ops.gptlab.int8_product(rows, layer._compile_key, zero_point)
    return _QDQ_LINEAR(rows, 1.0 / QMAX, zero_point, layer._packed)


class Int8Linear(nn.Module):
    """A Linear layer computed in int8 (see the module): weights per output channel, each input
    row rounded to 8 bits on its own grid at every call.

    The weights live in fbgemm's packed form (not a parameter or buffer: they are not trained
    and do not move between devices); ``int8_weight`` and ``dequantized_weight`` unpack them.
    The bias, if any, stays a float parameter.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        #: 1 / s per input channel (see the module: smoothing), or None; the weight was multiplied by s
        self.register_buffer("smooth", None if smooth is None else smooth.float().clone())
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            # torch 2.13 marks quantised tensors deprecated; the packed kernels are not (yet).
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero_points, 0)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self._split_sign = reduce_range()  # see _int8_matmul
        self._compile_key = _compilable(self)  # how a compiled graph names this layer
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linears(cls, linears: list[nn.Linear], input_peak: torch.Tensor | None = None,
                     alpha: float = 0.5) -> Int8Linear:
        """One int8 layer for ``linears`` that read the same input, their outputs side by side
        (one layer: itself). ``input_peak`` (in,): max |x_j| over a calibration text, to smooth by."""
        weight = torch.cat([lin.weight.detach().float() for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(lin.out_features) for b, lin in zip(biases, linears)])
        smooth = None
        if input_peak is not None:
            s = smoothing_factors(input_peak, weight, alpha)
            weight, smooth = weight * s, 1.0 / s
        q, scale = quantize_weight(weight)
        return cls(q, scale, bias, smooth)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_linears([linear])

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (out, in) int8, scale (out,) float32), unpacked from fbgemm's layout."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.int_repr(), qweight.q_per_channel_scales().float()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the int8 one stands for, (out, in) float32 (smoothing undone)."""
        q, scale = self.int8_weight()
        w = q.float() * scale[:, None]
        return w if self.smooth is None else w * self.smooth

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy, pickle) is a layer of its own, and a graph must find it by its own key.
        super().__setstate__(state)
        self._compile_key = _compilable(self)

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 weights and their scales (the bias is a parameter, counted there)."""
        return self.out_features * (self.in_features + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out), in x's dtype; fbgemm takes and gives float32 rows. Decoding
        # calls this hundreds of times a token with a single row, so each operation counts.
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.float32:
            rows = rows.float()
        if self.smooth is not None:
            rows = rows * self.smooth
        peak = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).clamp_min_(TINY)  # max |x|
        y = _int8_matmul(rows / peak, self).mul_(peak)
        if self.bias is not None:
            y.add_(self.bias)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8, "
                f"bias={self.bias is not None}, smoothed={self.smooth is not None}")


class Int8Slice(nn.Module):
    """One of the layers joined into a shared ``Int8Linear`` (q, k, v; gate, up), in its place.

    The first of them called with an input computes the joined layer once and keeps the
    outputs; the others, called with the same tensor, take their columns; when all have, the
    outputs are let go. Called with another tensor, it computes again: always correct, fast in
    the order the blocks call them."""

    def __init__(self, joined: Int8Linear, shared: dict, index: int, sizes: list[int]) -> None:
        super().__init__()
        self.joined, self.index, self.sizes = joined, index, sizes
        self.out_features, self.in_features = sizes[index], joined.in_features
        self._shared = shared  # {"input": x, "outputs": [...], "left": {indices not yet taken}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self._shared
        if shared.get("input") is not x:
            shared.update(input=x, outputs=self.joined(x).split(self.sizes, dim=-1), left=set(range(len(self.sizes))))
        out = shared["outputs"][self.index]
        shared["left"].discard(self.index)
        if not shared["left"]:
            shared.clear()
        return out

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.sizes)}, out_features={self.out_features}"


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


#: layers of one module that read the same input, joined into one int8 matrix when all are there
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: layers left unsmoothed: those that read a norm's output (q/k/v, gate/up, the head) have large
#: channels in every token, where smoothing helps (on SmolLM2 it cut the logits' error from each
#: of them alone: 6.4 -> 2.2%, 5.6 -> 2.8%, 3.0 -> 2.0%); the MLP's down projection reads values
#: that are large in a few tokens rather than in a few channels, where it doubled the error
#: (6.5 -> 12.5%); the attention output's error was small either way (benchmarks/RESULTS.md)
UNSMOOTHED = ("o_proj", "down_proj")


def linear_groups(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """Every ``nn.Linear`` of the blocks and the head as (parent, names): names that read one
    input (``SHARED_INPUT``) together, every other layer alone."""
    groups = []
    for parent in [*model.layers.modules(), model]:
        linears = {name: child for name, child in parent.named_children() if isinstance(child, nn.Linear)}
        if parent is model:
            linears = {"lm_head": model.lm_head}
        for names in SHARED_INPUT:
            if all(isinstance(linears.get(n), nn.Linear) for n in names):
                groups.append((parent, list(names)))
                for n in names:
                    del linears[n]
        groups.extend((parent, [name]) for name in linears)
    return groups


@torch.no_grad()
def calibrate(model: nn.Module, ids: torch.Tensor,
              layers: list[nn.Linear] | None = None) -> dict[nn.Linear, torch.Tensor]:
    """max |x_j| (in,) of the input of each of ``layers`` (default: every Linear), over the tokens
    of one forward pass of ``ids`` (1, T) but the first: a first token often has activations far
    larger than any other's, in a few channels, and its own grid copes with them without help."""
    peaks: dict[nn.Linear, torch.Tensor] = {}
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]

    def record(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()[..., 1:, :].reshape(-1, args[0].shape[-1]).float()
        peak = x.abs().amax(dim=0) if len(x) else torch.zeros(x.shape[-1])
        peaks[module] = torch.maximum(peaks[module], peak) if module in peaks else peak

    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        model(ids.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return peaks


def calibration_ids(tokenizer, block_size: int) -> torch.Tensor | None:
    """``CALIBRATION_TEXT`` in ``tokenizer``'s ids, (1, T), at most ``block_size`` of them. A
    vocabulary that lacks some of its characters (a character model's) gets the words it can
    encode; None if that leaves fewer than two tokens (then nothing is smoothed)."""
    try:
        ids = tokenizer.encode(CALIBRATION_TEXT)
    except UserError:
        ids = []
        for piece in re.split(r"(\s+)", CALIBRATION_TEXT):
            with contextlib.suppress(UserError):
                ids += tokenizer.encode(piece)
    return torch.tensor([ids[:block_size]]) if len(ids) >= 2 else None


def checkpoint_calibration(checkpoint) -> torch.Tensor | None:
    """``calibration_ids`` for a loaded checkpoint: its tokenizer, at most its context."""
    return calibration_ids(checkpoint.tokenizer, checkpoint.config.block_size)


def quantize_int8(model: nn.Module, calibration: torch.Tensor | None = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` in ``model.layers`` and the output head by int8
    layers (``Int8Linear``; layers that read one input joined, see the module); return the
    model. With ``calibration`` ids (1, T) (``calibration_ids``), each layer is smoothed by
    what the model's activations on them measure. Embeddings and norms stay as they are.

    LoRA layers (subclasses of nn.Linear) are refused: merge the adapter first.
    """
    if not hasattr(model, "layers") or not hasattr(model, "lm_head"):
        raise UserError(f"int8 quantisation needs a GPT with blocks and an output head, not a {type(model).__name__}")
    problem = int8_problem(model)
    if problem:
        raise UserError(problem)
    groups = linear_groups(model)
    for parent, names in groups:  # all checked before any is replaced
        for name in names:
            if type(getattr(parent, name)) is not nn.Linear:
                raise UserError(f"{name} is a {type(getattr(parent, name)).__name__}, which int8 quantisation does "
                                "not handle; merge the LoRA adapter first (gptlab merge)")
    # The first layer of a group stands for the group: its layers read the same input.
    smoothed = [getattr(parent, names[0]) for parent, names in groups if names[0] not in UNSMOOTHED]
    peaks = calibrate(model, calibration, smoothed) if calibration is not None else {}
    for parent, names in groups:
        linears = [getattr(parent, name) for name in names]
        joined = Int8Linear.from_linears(linears, peaks.get(linears[0]))
        if len(names) == 1:
            setattr(parent, names[0], joined)
            continue
        shared: dict = {}
        for i, name in enumerate(names):
            setattr(parent, name, Int8Slice(joined, shared, i, [lin.out_features for lin in linears]))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and int8 weights, each tensor counted once
    (a tied head is the embedding, unless quantised). Position tables (RoPE's cos and sin) are
    buffers too, and counted."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) + sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))
