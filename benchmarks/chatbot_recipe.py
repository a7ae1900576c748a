"""A chatbot grown from scratch, offline, on a CPU: pretrain, fine-tune, test.

    python benchmarks/chatbot_recipe.py                    # into runs/chatbot (replaced if there)
    python benchmarks/chatbot_recipe.py --pretrain-time 300 --sft-steps 300

1. data: Shakespeare (``shakespeare-tiny``) and synthetic conversations rendered as plain
   ``User: ...\\nAssistant: ...`` text (``synth_text``), interleaved in pieces into one text file,
   so the validation tail holds both; and a separate set of synthetic chats for fine-tuning
   (``gptlab data synth-chat``, another seed, so new questions of the training split).
2. pretrain: ``gptlab train --corpus FILE --tokenizer char`` (character level: spelling and
   counting letters need to see the letters), stopped by ``--max-time``.
3. SFT: ``gptlab finetune sft`` on the chats; the loss counts only the answers.
4. test: exact match on held-out questions (``evaluate_exact_match``), which no stage saw.

Each stage's command and wall time are printed; the commands run as subprocesses, exactly as a
person would type them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gptlab.cache import atomic_write_text
from gptlab.data.sources import load_corpus
from gptlab.finetune.synth import evaluate_exact_match, synth_text

#: the model: small enough to see several million characters in minutes on 2 cores
#: (Llama-style blocks: RoPE's relative positions help copying a word or a number into the answer)
MODEL_FLAGS = ["--block-size", "256", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--dropout", "0.0",
               "--pos-embedding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias"]


def gptlab() -> str:
    """The console script of the Python running this file (the venv's, not another one)."""
    beside = Path(sys.executable).with_name("gptlab")
    return str(beside) if beside.exists() else (shutil.which("gptlab") or "gptlab")


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(["gptlab", *cmd[1:]]), flush=True)
    subprocess.run(cmd, check=True)


def interleave(a: str, b: str, pieces: int) -> str:
    """``a`` and ``b`` cut at line breaks into ``pieces`` parts each and alternated."""
    def cut(text: str) -> list[str]:
        out, start = [], 0
        for k in range(1, pieces + 1):
            end = len(text) if k == pieces else text.find("\n\n", len(text) * k // pieces) + 2
            if end > start + 1:
                out.append(text[start:end])
                start = end
        return out
    return "\n".join(x + y for x, y in zip(cut(a), cut(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/chatbot", help="folder for everything (default: runs/chatbot)")
    ap.add_argument("--shakespeare", type=int, default=100_000, help="characters of Shakespeare to pretrain on")
    ap.add_argument("--synth-text", type=int, default=30_000, help="synthetic conversations in the pretraining text")
    ap.add_argument("--synth-chats", type=int, default=8_000, help="synthetic conversations for SFT")
    ap.add_argument("--pretrain-time", type=float, default=780, help="pretraining seconds at most (default: 780)")
    ap.add_argument("--pretrain-steps", type=int, default=1800,
                    help="length of the pretraining schedule; set it to what fits in --pretrain-time, so the "
                         "learning rate decays fully")
    ap.add_argument("--sft-steps", type=int, default=200, help="SFT optimizer steps (default: 200)")
    ap.add_argument("--sft-time", type=float, default=180, help="SFT seconds at most (default: 180)")
    ap.add_argument("--n", type=int, default=200, help="held-out questions to ask (default: 200)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every stage (OMP_NUM_THREADS); 1 can beat 2 on a busy machine")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    exe = gptlab()
    times: dict[str, float] = {}
    overall = time.perf_counter()

    start = time.perf_counter()
    shakespeare = load_corpus("shakespeare-tiny").text[:args.shakespeare]
    synthetic = synth_text(args.synth_text, seed=0)
    corpus = out / "pretrain.txt"
    atomic_write_text(corpus, interleave(shakespeare, synthetic, pieces=50))
    print(f"pretraining text: {len(shakespeare):,} characters of Shakespeare + {len(synthetic):,} of synthetic "
          f"chat -> {corpus}", flush=True)
    chats = out / "sft.jsonl"
    run([exe, "data", "synth-chat", "--out", str(chats), "--split", "train", "--n", str(args.synth_chats),
         "--seed", "1", "--force"])
    times["data"] = time.perf_counter() - start

    start = time.perf_counter()
    run([exe, "train", "--corpus", str(corpus), "--tokenizer", "char", *MODEL_FLAGS, "--batch-size", "8",
         "--max-steps", str(args.pretrain_steps), "--max-time", str(args.pretrain_time), "--lr", "3e-3",
         "--warmup-steps", "100", "--min-lr-ratio", "0.05", "--beta2", "0.99", "--weight-decay", "0.1",
         "--eval-interval", "1000", "--eval-batches", "20", "--log-interval", "50", "--dtype", "fp32",
         "--out", str(out / "pretrain"), "--force", "--no-progress"])
    times["pretrain"] = time.perf_counter() - start

    start = time.perf_counter()
    run([exe, "finetune", "sft", str(out / "pretrain"), "--data", str(chats), "--out", str(out / "sft"), "--force",
         "--max-steps", str(args.sft_steps), "--max-time", str(args.sft_time), "--batch-size", "32", "--lr", "1e-3",
         "--warmup-steps", "20", "--eval-interval", "200", "--eval-batches", "5", "--dtype", "fp32",
         "--no-progress"])
    times["sft"] = time.perf_counter() - start

    start = time.perf_counter()
    result = evaluate_exact_match(str(out / "sft"), n=args.n)
    times["eval"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - overall

    print("\nexact match on held-out questions (greedy):")
    for kind, t in result["per_kind"].items():
        print(f"  {kind:<11} {t['correct']:>3}/{t['total']:<3} {t['accuracy']:6.1%}")
    print(f"  {'overall':<11} {result['correct']:>3}/{result['n']:<3} {result['accuracy']:6.1%}")
    for f in result["failures"][:5]:
        print(f"  wrong [{f['kind']}] {f['question']!r}: expected {f['expected']!r}, got {f['got']!r}")
    load = os.getloadavg()
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
          + f"  (load average now {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
