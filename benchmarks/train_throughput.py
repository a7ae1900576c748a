"""Training throughput and model FLOPs utilisation (MFU) for fp32 and bf16, eager and compiled.

MFU = achieved model FLOP/s / peak FLOP/s, where model FLOPs per token are
6N + 12*L*H*Q*T (GPT.flops_per_token). The peak depends on the device:
- on a GPU it is the datasheet dense peak for the dtype (gptlab.train.system.GPU_PEAK_TFLOPS:
  A100, H100, H200, L4, RTX cards...; fp32 counts as TF32, which the loop turns on);
- on a CPU it is *measured*: the best of large square matmuls, taken over the precisions
  measured (a precision the CPU only emulates, bf16 on AVX2, has a "peak" below what autocast
  achieves by keeping most work in fp32, so the best one is the honest denominator).

    python benchmarks/train_throughput.py                      # default preset, all paths, CPU
    python benchmarks/train_throughput.py --model gpt2-small --steps 3 --dtypes fp32
    python benchmarks/train_throughput.py --device cuda --model gpt2-124m --dtypes bf16 --paths compiled

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
from gptlab.train.system import autocast, cpu_has_fast_bf16, device_peak_flops, to_device, use_fast_matmuls

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {
    # name: (model overrides, batch size)
    "default": ({**PRESETS["shakespeare-char"]["model"], "vocab_size": 76}, PRESETS["shakespeare-char"]["train"]["batch_size"]),
    "gpt2-recipe": ({**PRESETS["shakespeare-char-gpt2"]["model"], "vocab_size": 76},
                    PRESETS["shakespeare-char-gpt2"]["train"]["batch_size"]),
    "gpt2-small": ({"vocab_size": 50257, "block_size": 256, "n_layer": 12, "n_head": 12, "n_embd": 768}, 4),
    # GPT-2 124M as trained on GPUs: the full 1024 context, and the vocabulary padded to 50304 (a
    # multiple of 64) so the head's matmul tiles evenly, as nanoGPT does.
    "gpt2-124m": ({"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}, 16),
}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n matmul over repeated timings."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        (a @ b).sum().item()  # .item() waits for an asynchronous device
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def time_steps(model_kw: dict, batch_size: int, dtype: str, compiled: bool, steps: int, warmup: int,
               device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(**model_kw)
    model = GPT(cfg).to(device)
    opt = build_optimizer(model, TrainConfig(), device)
    fwd = torch.compile(model) if compiled else model
    batch = (torch.randint(cfg.vocab_size, (batch_size, cfg.block_size)),
             torch.randint(cfg.vocab_size, (batch_size, cfg.block_size)))
    times, losses = [], []
    for i in range(warmup + steps):
        t = time.perf_counter()
        x, y = to_device(batch, device)
        with autocast(device, DT[dtype]):
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also waits for the device, so the step is timed whole
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = batch_size * cfg.block_size
    return {"step_s": step_s, "tok_s": tokens / step_s, "flops_s": model.flops_per_token() * tokens / step_s,
            "params": model.num_parameters(), "last_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), action="append")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--paths", default="eager,compiled", help="eager, compiled or both")
    ap.add_argument("--batch-size", type=int, default=None, help="override the model's batch size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16-steps", type=int, default=2, help="steps for bf16 where it is emulated (very slow)")
    args = ap.parse_args()
    device = torch.device(args.device)
    use_fast_matmuls(device)
    dtypes = args.dtypes.split(",")
    if device.type == "cuda":
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
        peaks = {d: device_peak_flops(device, DT[d]) for d in dtypes}
        for d in dtypes:
            print(f"matmul {d}: datasheet peak {peaks[d] / 1e12 if peaks[d] else float('nan'):.1f} TFLOP/s, "
                  f"measured {matmul_peak(DT[d], device, n=8192) / 1e12:.1f} TFLOP/s")
    else:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
              f"{torch.backends.cpu.get_cpu_capability()}, fast bf16: {cpu_has_fast_bf16()}")
        measured = {d: matmul_peak(DT[d], device) for d in dtypes}
        for d, p in measured.items():
            print(f"measured matmul peak {d}: {p / 1e9:.1f} GFLOP/s")
        peaks = dict.fromkeys(dtypes, max(measured.values()))
    for name in args.model or ["default"]:
        model_kw, batch = MODELS[name]
        batch = args.batch_size or batch
        for d in dtypes:
            slow = device.type == "cpu" and d == "bf16" and not cpu_has_fast_bf16()
            for path in args.paths.split(","):
                steps = args.bf16_steps if slow else args.steps
                r = time_steps(model_kw, batch, d, path == "compiled", steps, 1 if slow else args.warmup, device)
                mfu = f"{r['flops_s'] / peaks[d]:5.1%}" if peaks[d] else "  n/a"
                print(f"{name:10} {r['params'] / 1e6:6.2f}M  batch {batch}  {d}  {path:8}  "
                      f"{r['step_s'] * 1e3:8.1f} ms/step  {r['tok_s']:9.0f} tok/s  "
                      f"{r['flops_s'] / 1e9:9.1f} GFLOP/s  MFU {mfu}", flush=True)


if __name__ == "__main__":
    main()
