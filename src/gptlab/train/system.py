"""Device and numeric precision: pick what the hardware runs fastest without hurting loss.

bf16 autocast halves memory traffic and, on hardware with bf16 matrix units, multiplies
matmul speed; on hardware without them it is emulated and far slower than fp32 (measured on
an AVX2-only EPYC: 1.3 GFLOP/s bf16 against 150 GFLOP/s fp32, see benchmarks/RESULTS.md). So
``dtype="auto"`` takes bf16 only where the hardware has it: CUDA devices that support bf16,
and CPUs that report AVX-512 BF16 or AMX.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.errors import UserError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but it is not available; use --device auto or cpu")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr: the run goes on, but the user should know."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def use_fast_matmuls(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation:
    several times faster and, for training, as good). Mixed-precision work is unaffected."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch to ``device``. On CUDA it goes through pinned (page-locked) host memory, so the
    copy is asynchronous and the next step's launch does not wait for it."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
    return tuple(t.to(device) for t in batch)


def dtype_problem(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why ``dtype`` cannot be used for autocast on ``device``, or None if it can."""
    if device.type == "cpu" and dtype == torch.float16:
        return "fp16 autocast is for GPUs (CPUs have no fast fp16 matrix units)"
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16 support"
    return None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``--dtype name``. A dtype the device cannot run falls back, with a warning,
    to what ``auto`` picks; bf16 on a CPU that only emulates it runs, with a warning that it is slow."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    dtype = _DTYPES[name]
    problem = dtype_problem(dtype, device)
    if problem is not None:
        fallback = pick_dtype("auto", device)
        warn(f"--dtype {name} on {device.type}: {problem}; using {dtype_name(fallback)} instead")
        return fallback
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        warn("--dtype bf16: this CPU has no bf16 matrix instructions (AVX-512 BF16 or AMX), so bf16 is "
             "emulated and usually far slower than fp32; --dtype auto picks fp32 here")
    return dtype


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


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32. Weights stay fp32 either way."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]
