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

Each configuration runs warm-up steps, then the configurations of one model take --steps optimizer
steps in turns (so machine noise hits them alike), and each reports its median step time and its
speed relative to the first. Figures go to stdout; record them in benchmarks/RESULTS.md.
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
from gptlab.device import autocast, cpu_has_fast_bf16, to_device, use_fast_matmuls
from gptlab.train.system import device_peak_flops

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = {
    # name: (model overrides, optimizer, batch size)
    "default": ({**PRESETS["shakespeare-char"]["model"], "vocab_size": 76},
                PRESETS["shakespeare-char"]["train"]["optimizer"], PRESETS["shakespeare-char"]["train"]["batch_size"]),
    "gpt2-recipe": ({**PRESETS["shakespeare-char-gpt2"]["model"], "vocab_size": 76}, "adamw",
                    PRESETS["shakespeare-char-gpt2"]["train"]["batch_size"]),
    "char-gpu": ({**PRESETS["shakespeare-char-gpu"]["model"], "vocab_size": 76}, "adamw",
                 PRESETS["shakespeare-char-gpu"]["train"]["batch_size"]),
    "gpt2-small": ({"vocab_size": 50257, "block_size": 256, "n_layer": 12, "n_head": 12, "n_embd": 768}, "adamw", 4),
    # GPT-2 124M as trained on GPUs: the full 1024 context, and the vocabulary padded to 50304 (a
    # multiple of 64) so the head's matmul tiles evenly, as nanoGPT does.
    "gpt2-124m": ({"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}, "adamw", 16),
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


class StepTimer:
    """One model and optimizer, stepped on demand; each step timed whole (forward, backward,
    clip, optimizer step, and a wait for the device)."""

    def __init__(self, model_kw: dict, optimizer: str, batch_size: int, dtype: str, compiled: bool,
                 device: torch.device) -> None:
        torch.manual_seed(0)
        self.cfg = ModelConfig(**model_kw)
        self.model = GPT(self.cfg).to(device)
        self.opt = build_optimizer(self.model, TrainConfig(optimizer=optimizer), device)
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.batch = (torch.randint(self.cfg.vocab_size, (batch_size, self.cfg.block_size)),
                      torch.randint(self.cfg.vocab_size, (batch_size, self.cfg.block_size)))
        self.dtype, self.device, self.times, self.loss = DT[dtype], device, [], float("nan")

    def step(self, record: bool = True) -> None:
        t = time.perf_counter()
        x, y = to_device(self.batch, self.device)
        with autocast(self.device, self.dtype):
            _, loss = self.fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.item()  # also waits for the device, so the step is timed whole
        if record:
            self.times.append(time.perf_counter() - t)

    def result(self) -> dict:
        step_s = statistics.median(self.times)
        tokens = self.batch[0].numel()
        return {"step_s": step_s, "tok_s": tokens / step_s, "flops_s": self.model.flops_per_token() * tokens / step_s,
                "params": self.model.num_parameters(), "last_loss": self.loss}


def time_in_turns(timers: list[StepTimer], steps: int, warmup: int) -> None:
    """Warm every timer up, then step them in turns, so that a noisy neighbour slows all of them
    alike and their ratio holds even when the absolute times drift."""
    for timer in timers:
        for _ in range(warmup):
            timer.step(record=False)
    for _ in range(steps):
        for timer in timers:
            timer.step()


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
        model_kw, optimizer, batch = MODELS[name]
        batch = args.batch_size or batch
        configs = [(d, path) for d in dtypes for path in args.paths.split(",")]
        timers = [StepTimer(model_kw, optimizer, batch, d, path == "compiled", device) for d, path in configs]
        emulated = device.type == "cpu" and "bf16" in dtypes and not cpu_has_fast_bf16()
        time_in_turns(timers, args.bf16_steps if emulated else args.steps, 1 if emulated else args.warmup)
        first = timers[0].result()
        for (d, path), timer in zip(configs, timers):
            r = timer.result()
            mfu = f"{r['flops_s'] / peaks[d]:5.1%}" if peaks[d] else "  n/a"
            print(f"{name:10} {r['params'] / 1e6:6.2f}M  batch {batch}  {d}  {path:8}  "
                  f"{r['step_s'] * 1e3:8.1f} ms/step  {r['tok_s']:9.0f} tok/s  "
                  f"{r['flops_s'] / 1e9:9.1f} GFLOP/s  MFU {mfu}  speed {first['step_s'] / r['step_s']:.2f}x "
                  f"{configs[0][0]} {configs[0][1]}", flush=True)

if __name__ == "__main__":
    main()
