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
from pathlib import Path

import torch

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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise UserError("--dtype fp16 is for GPUs; on the CPU use fp32 or bf16")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32. Weights stay fp32 either way."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]
