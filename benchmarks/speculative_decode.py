"""Prompt-lookup speculative decoding (``--speculate N``) against plain greedy decoding, on a
prompt whose answer quotes its context and on plain chat (issue 19).

    python benchmarks/speculative_decode.py                  # SmolLM2-135M-Instruct, fp32
    python benchmarks/speculative_decode.py --drafts 4,8 --repeat 5

Each prompt goes through the model's chat template; greedy, --new tokens (EOS ignored), batch 1,
the engine's KV cache. Plain and speculative engines take turns, run by run, so machine noise
falls on both alike; figures are medians of --repeat runs, the speed-up the median of the
per-round ratios. Also printed: whether the tokens are identical (they must be) and how many
tokens each forward pass produced. Figures for RESULTS.md; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptlab.inference.engine import Engine, SamplingParams
from gptlab.weights.load import load_checkpoint

PASSAGE = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs and "
    "900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square kilometres. "
    "The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen from outer space "
    "and is the world's biggest single structure made by living organisms. This reef structure is composed of and "
    "built by billions of tiny organisms, known as coral polyps. It supports a wide diversity of life and was "
    "selected as a World Heritage Site in 1981."
)
PROMPTS = {
    "quotes its context": f"Summarise this passage in three sentences, using its own words.\n\n{PASSAGE}",
    "plain chat": "What are some good ways to stay healthy? Give me a few tips.",
}


def timed(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = engine.generate_batch([prompt], params)[0].token_ids
    return len(ids) / (time.perf_counter() - start), ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--drafts", default="8", help="draft lengths to try, comma-separated (default: 8)")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    plain = Engine(ckpt, dtype="fp32")
    drafts = [int(d) for d in args.drafts.split(",")]
    speculative = {d: Engine(ckpt, dtype="fp32", speculate=d) for d in drafts}  # one model, shared
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new, ignore_eos=True)
    print(f"{args.model}, fp32, greedy, batch 1, {args.new} new tokens; {torch.get_num_threads()} threads; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; medians of {args.repeat}")
    print(f"{'prompt':<20} {'engine':<14} {'tok/s':>7} {'speed-up':>9} {'tokens/pass':>12} {'same tokens':>12}")
    for name, text in PROMPTS.items():
        prompt = plain.chat_prompt([{"role": "user", "content": text}], args.new).ids
        timed(plain, prompt, params)  # warm-up
        rates: dict[str, list[float]] = {"plain": []}
        ratios: dict[int, list[float]] = {d: [] for d in drafts}
        same: dict[int, bool] = {}
        before = {d: (e.speculation.passes, e.speculation.tokens) for d, e in speculative.items()}
        for _ in range(args.repeat):
            base, reference = timed(plain, prompt, params)
            rates["plain"].append(base)
            for d, engine in speculative.items():
                rate, ids = timed(engine, prompt, params)
                rates.setdefault(f"speculate {d}", []).append(rate)
                ratios[d].append(rate / base)
                same[d] = same.get(d, True) and ids == reference
        print(f"{name:<20} {'plain':<14} {statistics.median(rates['plain']):>7.1f} {'1.00x':>9} {'1.00':>12} {'':>12}")
        for d, engine in speculative.items():
            passes = engine.speculation.passes - before[d][0]
            tokens = engine.speculation.tokens - before[d][1]
            print(f"{'':<20} {f'speculate {d}':<14} {statistics.median(rates[f'speculate {d}']):>7.1f} "
                  f"{statistics.median(ratios[d]):>8.2f}x {tokens / max(passes, 1):>12.2f} "
                  f"{'yes' if same[d] else 'NO':>12}", flush=True)
        print(f"{'':<20} answer: {plain.tokenizer.decode(reference)[:160]!r}")


if __name__ == "__main__":
    main()
