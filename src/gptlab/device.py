"""Where a model runs and in what precision: one rule for every command.

``--dtype auto`` (the default of ``train``, ``finetune``, ``eval``, ``sample``, ``chat`` and ``serve``)
follows ``auto_dtype``, a pure function of the hardware:

- a CUDA GPU with bf16 (Ampere and newer): bf16. Tensor cores run it several times faster
  than fp32, and bf16 keeps fp32's exponent range, so training needs no loss scaling.
- decoding (``sample``, ``chat``, ``serve``) on a CPU with bf16 instructions (AVX-512 BF16 or
  AMX): bf16 weights. Each new token reads every weight once, so half the bytes is up to twice
  the speed, and the CPU multiplies bf16 natively. An answer is text, not a figure to compare
  between machines, and greedy answers stay those of the model in bf16 on every such CPU.
- everything else, every CPU included: fp32. On a CPU without bf16 instructions (AVX2) bf16 is
  emulated and far slower than fp32 (100x on a 2-core EPYC). For training and evaluation on a
  CPU with them, bf16 is faster for large matrices, but then the same command prints different
  losses on different laptops, and the tour's shown outputs and the test suite's tolerances hold
  on one kind of machine only. A learner's first runs are small models, where bf16 gains least
  (see benchmarks/RESULTS.md, "bf16 autocast on a CPU"), so fp32 it is; ``--dtype bf16`` asks.

An explicit ``--dtype`` is honoured where the device can run it; where it cannot (fp16 on a
CPU, bf16 on an old GPU) the command warns once and uses what ``auto`` picks.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the values of every command's --dtype flag
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_HELP = ("compute precision: auto (bf16 on a CUDA GPU that has it; fp32 on every CPU, for the same numbers on "
              "every machine), fp32, bf16 (fast on CPUs with AVX-512 BF16 or AMX), fp16 (GPUs)")
#: the same for the commands that decode (sample, chat, serve), where auto differs on CPUs with bf16
DECODING_DTYPE_HELP = ("precision of the weights while decoding: auto (bf16 on a CUDA GPU or a CPU with AVX-512 BF16 "
                       "or AMX, which halves the bytes each token reads; fp32 elsewhere, and beside --quantize int8), "
                       "fp32, bf16, fp16 (GPUs)")


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr: the run goes on, but the user should know."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


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


@dataclass(frozen=True)
class Hardware:
    """What the dtype rule looks at."""

    device: str
    """cpu, cuda or mps"""
    cpu_capability: str = "DEFAULT"
    """torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ..."""
    cpu_bf16: bool = False
    """the CPU has bf16 matrix instructions (avx512_bf16 or amx_bf16)"""
    cuda_bf16: bool = False
    """the CUDA device supports bf16 (compute capability 8.0 and newer)"""

    @classmethod
    def of(cls, device: torch.device) -> Hardware:
        """The hardware behind ``device``, as this machine reports it."""
        return cls(device=device.type, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   cpu_bf16=cpu_has_fast_bf16(),
                   cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported())


def auto_dtype(hw: Hardware, decoding: bool = False) -> torch.dtype:
    """What ``--dtype auto`` runs in on ``hw``: bf16 on CUDA GPUs that have it, and for
    ``decoding`` on CPUs with bf16 instructions; fp32 everywhere else (the module docstring says
    why training and evaluation on those CPUs get fp32 too)."""
    if hw.device == "cuda" and hw.cuda_bf16:
        return torch.bfloat16
    if decoding and hw.device == "cpu" and hw.cpu_bf16:
        return torch.bfloat16
    return torch.float32


def dtype_problem(dtype: torch.dtype, hw: Hardware) -> str | None:
    """Why ``dtype`` cannot be used on ``hw``, or None if it can."""
    if hw.device in ("cpu", "mps") and dtype == torch.float16:
        return f"fp16 is for CUDA GPUs ({hw.device} has no fast fp16 matrix units)"
    if hw.device == "cuda" and dtype == torch.bfloat16 and not hw.cuda_bf16:
        return "this GPU has no bf16 support"
    return None


@dataclass(frozen=True)
class Precision:
    """The dtype a command computes in, and why it was chosen."""

    dtype: torch.dtype
    why: str
    """auto, asked (--dtype NAME) or the reason for a fallback"""

    @property
    def name(self) -> str:
        return dtype_name(self.dtype)

    def __str__(self) -> str:  # as run headers show it: "fp32 (auto)"
        return f"{self.name} ({self.why})"


def pick_dtype(name: str, device: torch.device, hw: Hardware | None = None, decoding: bool = False) -> Precision:
    """The precision for ``--dtype name`` on ``device`` (``decoding``: for sample, chat and serve).
    A dtype the device cannot run falls back, with a warning, to what ``auto`` picks; bf16 on a
    CPU that only emulates it runs, with a warning that it is slow."""
    hw = hw or Hardware.of(device)
    if name == "auto":
        return Precision(auto_dtype(hw, decoding), "auto")
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    dtype = DTYPES[name]
    problem = dtype_problem(dtype, hw)
    if problem is not None:
        fallback = auto_dtype(hw, decoding)
        warn(f"--dtype {name} on {hw.device}: {problem}; using {dtype_name(fallback)} instead")
        return Precision(fallback, f"{name} unavailable")
    if hw.device == "cpu" and dtype == torch.bfloat16 and not hw.cpu_bf16:
        warn(f"--dtype bf16: this CPU ({hw.cpu_capability}) has no bf16 matrix instructions (AVX-512 BF16 or AMX), "
             "so bf16 is emulated and usually far slower than fp32; --dtype auto picks fp32")
    return Precision(dtype, f"--dtype {name}")


#: the size from which ``bf16_hint`` speaks up. bf16 autocast on a CPU with AMX trained the
#: default 0.8M model at 0.96x fp32's speed, a 10.7M one at 1.55x and GPT-2 small at 2.0x
#: (benchmarks/RESULTS.md, "bf16 autocast on a CPU").
BF16_HINT_PARAMS = 10_000_000


def bf16_hint(precision: Precision, hw: Hardware, n_params: int) -> str | None:
    """A line for the run's header when ``auto`` chose fp32 on a CPU that runs bf16 in hardware
    and the model is large enough for bf16 to pay; None otherwise."""
    if (hw.device == "cpu" and hw.cpu_bf16 and precision.why == "auto" and precision.dtype == torch.float32
            and n_params >= BF16_HINT_PARAMS):
        return ("this CPU runs bf16 in hardware: --dtype bf16 trains a model of this size about 1.5-2x faster "
                "(its losses then differ from fp32's in the later digits)")
    return None


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in fp32. Weights stay fp32 either way."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


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
