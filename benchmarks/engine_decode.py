"""Generation speed: gptlab's KV-cached engine against transformers' generate, same weights.

    python benchmarks/engine_decode.py            # SmolLM2-135M-Instruct, fp32, greedy

Batch 1, a 64-token prompt, 128 new tokens (EOS ignored): time to first token (prefill plus
one step) and decode tokens/s over the remaining 127. The two engines take turns, run by run,
so that load from other work on a shared machine falls on both alike; the figures are medians
of --repeat runs, and the ratio is the median of the per-round ratios. Then the tokens/s of a
batch of 8 prompts of the same length, also in turns. The transformers model is built from
gptlab's own Hugging Face export of the same checkpoint, so both run identical fp32 weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import torch

from gptlab.inference.sampling import generate
from gptlab.train.checkpoint import load_checkpoint
from gptlab.weights.hf import export_hf


def ours(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    for i, _ in enumerate(generate(model, prompt, new, temperature=0.0)):
        if i == 0:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, (new - 1) * prompt.size(0) / (total - first)


def theirs(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
    total = time.perf_counter() - start
    return first, (new - 1) * prompt.size(0) / (total - first)


def rounds(models, prompt: torch.Tensor, new: int, repeat: int) -> list[tuple[tuple[float, float], ...]]:
    """``repeat`` rounds, each running every (fn, model) once, in turn."""
    return [tuple(fn(m, prompt, new) for fn, m in models) for _ in range(repeat)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import transformers

    ckpt = load_checkpoint(args.model)
    model = ckpt.model.eval()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf(ckpt, d, family=ckpt.config.arch)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 20000, (1, args.prompt_tokens), generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, transformers {transformers.__version__}; "
          f"{args.model}, prompt {args.prompt_tokens}, new {args.new_tokens}, greedy, fp32; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    models = ((ours, model), (theirs, ref))
    with torch.no_grad():
        a = [int(t) for t in generate(model, prompt, 16, temperature=0.0)]
        b = ref.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)[0, -16:]
        print(f"same 16 greedy tokens: {a == b.tolist()}")
        rounds(models, prompt, 4, 1)  # warm-up
        runs = rounds(models, prompt, args.new_tokens, args.repeat)
        for i, name in enumerate(("gptlab", "transformers")):
            ttft = statistics.median(r[i][0] for r in runs)
            tps = statistics.median(r[i][1] for r in runs)
            print(f"{name:13} batch 1: time to first token {ttft * 1e3:7.1f} ms, decode {tps:6.1f} tok/s", flush=True)
        ratio = statistics.median(r[0][1] / r[1][1] for r in runs)
        ttft_ratio = statistics.median(r[1][0] / r[0][0] for r in runs)
        print(f"gptlab / transformers, batch 1: decode {ratio:.2f}x, time to first token {ttft_ratio:.2f}x faster")
        batch = rounds(models, prompt.repeat(8, 1), args.new_tokens // 2, max(1, args.repeat // 2))
        for i, name in enumerate(("gptlab", "transformers")):
            tps = statistics.median(r[i][1] for r in batch)
            print(f"{name:13} batch 8: decode {tps:6.1f} tok/s (all sequences)", flush=True)
        print(f"gptlab / transformers, batch 8: decode {statistics.median(r[0][1] / r[1][1] for r in batch):.2f}x; "
              f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
