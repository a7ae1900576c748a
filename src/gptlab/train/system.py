"""What training adds to the device choice (``gptlab.device``): compiling with a fallback to
eager, and the GPUs' datasheet peaks that model FLOPs utilisation is measured against."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gptlab.device import dtype_name, warn


class CompiledOrEager(nn.Module):
    """``torch.compile(module)``, or the module itself if compiling fails (one warning, then eager).

    Compilation happens lazily on the first call (and again for new shapes), so that is where it can
    fail: no C++ compiler, an unsupported platform, an operator the compiler does not handle. When
    the compiled call raises, the same call is run eagerly; if that raises too, the error is the
    model's or the input's, not the compiler's, and it propagates unchanged, as without compiling.
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.module = module
        # Kept out of the module tree (a tuple, not an attribute nn.Module registers), so that
        # state_dict, .train() and .to() see the wrapped module once.
        self._compiled = (torch.compile(module, **compile_kwargs),)
        self.fell_back = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.fell_back:
            return self.module(*args, **kwargs)
        try:
            return self._compiled[0](*args, **kwargs)
        except Exception as compile_error:  # noqa: BLE001 -- judged by whether eager succeeds
            out = self.module(*args, **kwargs)
            self.fell_back = True
            cause: BaseException = compile_error
            # Dynamo wraps the root cause (as inner_exception or __cause__); that is what to show.
            while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
                cause = inner
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            warn(f"torch.compile failed ({type(cause).__name__}: {first}); continuing without "
                 "compiling (eager), which gives the same results, more slowly")
            return out


# Dense (no 2:4 sparsity) peak matmul throughput in TFLOP/s from the vendors' datasheets, by a
# substring of torch.cuda.get_device_name(). Order matters: the first match wins, so the more
# specific names come first. "fp32" is the plain CUDA-core rate; "tf32" is fp32 matmuls on tensor
# cores (on when torch.get_float32_matmul_precision() is not "highest"; see use_fast_matmuls).
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 and NVL
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "tf32": 35.6, "fp32": 35.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet peak FLOP/s of ``device`` for matmuls in ``dtype`` (fp32 counts as TF32 when
    PyTorch allows it), or None for a device not in GPU_PEAK_TFLOPS (CPUs: measure instead)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = dtype_name(dtype)
    if key == "fp32" and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if pattern in name:
            return peaks[key] * 1e12 if key in peaks else None
    return None
