"""Exact match of a chat model on held-out synthetic questions (gptlab.data.synth_chat, gptlab.inference.exact_match).

    python benchmarks/synth_chat_eval.py runs/chatbot-sft            # 200 questions, greedy
    python benchmarks/synth_chat_eval.py MODEL --n 450 --seed 1

Each question is asked alone with the model's chat template and greedy decoding; the reply,
stripped, must equal the computed answer exactly. The kinds are asked in turn, so each gets
about n/9 questions; the overall figure is the share of all n answered right. "new problem"
counts the questions whose problem training never showed (sums, spelling, ...), "new phrasing"
the remembered facts asked in a phrasing training never showed.
"""

from __future__ import annotations

import argparse
import time

from gptlab.inference.exact_match import evaluate_exact_match


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint or run directory, or any MODEL argument")
    ap.add_argument("--n", type=int, default=200, help="held-out questions to ask (default: 200)")
    ap.add_argument("--seed", type=int, default=0, help="which held-out questions (default: 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--failures", type=int, default=5, help="wrong answers to show (default: 5)")
    args = ap.parse_args()

    start = time.perf_counter()
    result = evaluate_exact_match(args.model, n=args.n, seed=args.seed, device=args.device)
    seconds = time.perf_counter() - start
    print(f"{'kind':<12} {'correct':>9} {'accuracy':>9}")
    for kind, t in result["per_kind"].items():
        print(f"{kind:<12} {t['correct']:>4}/{t['total']:<4} {t['accuracy']:>9.1%}")
    for held_out, t in sorted(result["per_held_out"].items()):
        print(f"{'new ' + held_out:<12} {t['correct']:>4}/{t['total']:<4} {t['accuracy']:>9.1%}")
    print(f"{'overall':<12} {result['correct']:>4}/{result['n']:<4} {result['accuracy']:>9.1%}   ({seconds:.1f} s)")
    for f in result["failures"][:args.failures]:
        print(f"  [{f['kind']}] {f['question']!r}\n      expected {f['expected']!r}\n      got      {f['got']!r}")


if __name__ == "__main__":
    main()
