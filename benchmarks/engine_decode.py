"""Generation speed: gptlab's KV-cached engine, eager and compiled, against transformers' generate.

    python benchmarks/engine_decode.py                       # all three engines
    python benchmarks/engine_decode.py --engines gptlab,compiled --compile-mode max-autotune-no-cudagraphs
    python benchmarks/engine_decode.py --engines gptlab,compiled --quantize int8

SmolLM2-135M-Instruct, fp32, greedy. Batch 1, a 64-token prompt, 128 new tokens (EOS ignored):
time to first token (prefill plus one step) and decode tokens/s over the remaining 127. The
engines take turns, run by run, so that load from other work on a shared machine falls on all
alike; the figures are medians of --repeat runs, and each ratio (against eager gptlab) is the
median of the per-round ratios. Then the tokens/s of a batch of 8 prompts of the same length,
also in turns.

- gptlab: the eager engine, a KV cache that grows with the text.
- compiled: ``compile_decode`` (torch.compile of the one-token step over a static KV
  cache). Its compile time is reported on its own: the first generation at each batch size
  (compiling) minus a later one of the same length.
- With --quantize int8 both gptlab engines run ``quantize_int8``'s int8 weights.
- transformers: built from gptlab's own Hugging Face export of the same checkpoint, so every
  engine runs identical fp32 weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch

from gptlab.inference.compiled_decode import compile_decode
from gptlab.inference.quantize import quantize_int8
from gptlab.inference.sampling import generate
from gptlab.weights.hf import export_hf
from gptlab.weights.load import load_checkpoint

ENGINES = ("gptlab", "compiled", "transformers")


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


def greedy_ids(name: str, model, prompt: torch.Tensor, n: int) -> list[int]:
    if name == "transformers":
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, -n:].tolist()
    return [int(t[0]) for t in generate(model, prompt, n, temperature=0.0)]


def rounds(engines: dict, prompt: torch.Tensor, new: int, repeat: int) -> list[dict[str, tuple[float, float]]]:
    """``repeat`` rounds, each running every engine once, in turn."""
    return [{name: fn(m, prompt, new) for name, (fn, m) in engines.items()} for _ in range(repeat)]


def report(runs: list[dict], batch: int) -> None:
    names = list(runs[0])
    for name in names:
        ttft = statistics.median(r[name][0] for r in runs)
        tps = statistics.median(r[name][1] for r in runs)
        first = f"time to first token {ttft * 1e3:7.1f} ms, " if batch == 1 else ""
        print(f"{name:13} batch {batch}: {first}decode {tps:6.1f} tok/s", flush=True)
    for name in names[1:]:
        ratio = statistics.median(r[name][1] / r[names[0]][1] for r in runs)
        print(f"{name} / {names[0]}, batch {batch}: decode {ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled engine")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quantize", choices=["int8"], default=None, help="int8 weights in the gptlab engines")
    args = ap.parse_args()
    names = args.engines.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(args.model)
    model = ckpt.model.eval()
    engines = {}
    if args.quantize:
        model = quantize_int8(copy.deepcopy(model))
    if "gptlab" in names:
        engines["gptlab"] = (ours, model)
    if "compiled" in names:
        compiled = copy.deepcopy(model)
        compile_decode(compiled, mode=args.compile_mode)
        engines["compiled"] = (ours, compiled)
    versions = ""
    if "transformers" in names:
        import transformers

        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_hf(ckpt, d, family=ckpt.config.arch)
            engines["transformers"] = (theirs, transformers.AutoModelForCausalLM.from_pretrained(d).eval())
        versions = f", transformers {transformers.__version__}"
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 20000, (1, args.prompt_tokens), generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{versions}; {args.model}, prompt "
          f"{args.prompt_tokens}, new {args.new_tokens}, greedy, {args.quantize or 'fp32'}, compile mode "
          f"{args.compile_mode}; load average before: {os.getloadavg()[0]:.2f}")
    with torch.no_grad():
        ids = {name: greedy_ids(name, m, prompt, 16) for name, (_, m) in engines.items()}
        print(f"same 16 greedy tokens in every engine: {len({tuple(v) for v in ids.values()}) == 1}")
        batch8 = prompt.repeat(8, 1)
        for p, new in ((prompt, args.new_tokens), (batch8, args.new_tokens // 2)):
            if "compiled" in engines:
                # Compiling happens in the first run at a new batch size and cache length.
                took = [ours(engines["compiled"][1], p, new) for _ in range(2)]
                total = [(new - 1) * p.size(0) / tps + ttft for ttft, tps in took]
                print(f"compiled, batch {p.size(0)}: compile {total[0] - total[1]:.1f} s "
                      f"(first run {total[0]:.1f} s, second {total[1]:.1f} s)", flush=True)
        rounds({k: v for k, v in engines.items() if k != "compiled"}, prompt, 4, 1)  # warm-up (compiled just was)
        report(rounds(engines, prompt, args.new_tokens, args.repeat), 1)
        report(rounds(engines, batch8, args.new_tokens // 2, max(1, args.repeat // 2)), 8)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
