"""Training throughput and model FLOPs utilisation (MFU) for fp32 and bf16, eager and compiled.

MFU = achieved model FLOP/s / peak FLOP/s, where model FLOPs per token are
6N + 12*L*H*Q*T (GPT.flops_per_token) and the peak is *measured* here: the best of large
square matmuls on this machine (not a datasheet figure), taken over the precisions measured.
Against the best peak, because a precision the hardware only emulates (bf16 on an AVX2 CPU)
has a "peak" below what autocast achieves by keeping most work in fp32.

    python benchmarks/train_throughput.py                      # default preset, all paths
    python benchmarks/train_throughput.py --model gpt2-small --steps 3 --dtypes fp32

Each configuration runs warm-up steps, then times --steps optimizer steps and reports the
median step time. Figures go to stdout; record them in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptlab.config import PRESETS, TrainConfig
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.train.optim import build_optimizer
from gptlab.train.system import autocast, cpu_has_fast_bf16

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {
    # name: (model overrides, batch size)
    "default": ({**PRESETS["shakespeare-char"]["model"], "vocab_size": 76}, PRESETS["shakespeare-char"]["train"]["batch_size"]),
    "gpt2-small": ({"vocab_size": 50257, "block_size": 256, "n_layer": 12, "n_head": 12, "n_embd": 768}, 4),
}


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n matmul over repeated timings."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def time_steps(model_kw: dict, batch_size: int, dtype: str, compiled: bool, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**model_kw)
    model = GPT(cfg)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    fwd = torch.compile(model) if compiled else model
    x = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size))
    y = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size))
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with autocast(torch.device("cpu"), DT[dtype]):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = batch_size * cfg.block_size
    return {"step_s": step_s, "tok_s": tokens / step_s, "flops_s": model.flops_per_token() * tokens / step_s,
            "params": model.num_parameters(), "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), action="append")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16-steps", type=int, default=2, help="steps for bf16 where it is emulated (very slow)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fast bf16: {cpu_has_fast_bf16()}")
    peaks = {d: matmul_peak(DT[d]) for d in args.dtypes.split(",")}
    for d, p in peaks.items():
        print(f"measured matmul peak {d}: {p / 1e9:.1f} GFLOP/s")
    for name in args.model or ["default"]:
        model_kw, batch = MODELS[name]
        for d in args.dtypes.split(","):
            slow = d == "bf16" and not cpu_has_fast_bf16()
            for compiled in (False, True):
                steps = args.bf16_steps if slow else args.steps
                r = time_steps(model_kw, batch, d, compiled, steps, 1 if slow else args.warmup)
                mfu = r["flops_s"] / max(peaks.values())
                print(f"{name:10} {r['params'] / 1e6:6.2f}M  {d}  {'compiled' if compiled else 'eager   '}  "
                      f"{r['step_s'] * 1e3:8.1f} ms/step  {r['tok_s']:9.0f} tok/s  "
                      f"{r['flops_s'] / 1e9:6.1f} GFLOP/s  MFU {mfu:5.1%}", flush=True)


if __name__ == "__main__":
    main()
