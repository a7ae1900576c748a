"""A chatbot grown from scratch, offline, on a CPU: pretrain, fine-tune, test.

    python benchmarks/chatbot_recipe.py                    # into runs/chatbot (replaced if there)
    python benchmarks/chatbot_recipe.py --pretrain-time 300 --pretrain-steps 1200 --sft-steps 100

1. data: 200k characters of Shakespeare (``shakespeare-tiny``) and 60,000 synthetic
   conversations (~7.2M characters) rendered as plain ``User: ...\nAssistant: ...`` text
   (``synth_text``), interleaved in pieces into one text file, so the validation tail holds both;
   and a separate set of synthetic chats for fine-tuning (``gptlab data synth-chat``, another seed,
   so new questions of the training split). Most of the text is synthetic because what the model
   must learn in minutes (copying a word or number from the question, adding, counting) is there.
2. pretrain: ``gptlab train --corpus FILE --tokenizer char`` (character level: spelling and
   counting letters need to see the letters) with Muon, stopped by ``--max-time``.
3. SFT: ``gptlab finetune sft`` on the chats; the loss counts only the answers.
4. test: exact match on held-out questions (``evaluate_exact_match``), which no stage saw.

Each stage's command and wall time are printed; the commands run as subprocesses, exactly as a
person would type them. Results and the runs behind the defaults: benchmarks/RESULTS.md,
"Chatbot from scratch".
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

import torch

from gptlab.cache import atomic_write_text
from gptlab.data.sources import load_corpus
from gptlab.data.synth_chat import synth_text
from gptlab.inference.exact_match import evaluate_exact_match

#: the model: small enough to see ten million characters in minutes on 2 cores (Llama-style blocks:
#: RoPE's relative positions help copying a word or a number into the answer). A conversation is
#: ~120 characters, so a block of 128 holds one or two whole and costs half of what 256 does.
MODEL_FLAGS = ["--block-size", "128", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--dropout", "0.0",
               "--pos-embedding", "rope", "--norm", "rmsnorm", "--mlp", "swiglu", "--no-bias"]


def pick_threads() -> int:
    """One thread when other processes already keep a core busy, else one per core. Threads that
    share their cores with other work wait on each other: on the 2-core CPU, under a load average
    of ~4, pretraining ran at ~1,500 tokens/s with 2 threads and 5,000-8,500 with 1."""
    return 1 if os.getloadavg()[0] >= 1 else (os.cpu_count() or 1)


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
    ap.add_argument("--shakespeare", type=int, default=200_000, help="characters of Shakespeare to pretrain on")
    ap.add_argument("--synth-text", type=int, default=60_000, help="synthetic conversations in the pretraining text")
    ap.add_argument("--synth-chats", type=int, default=10_000, help="synthetic conversations for SFT")
    ap.add_argument("--pretrain-time", type=float, default=780, help="pretraining seconds at most (default: 780)")
    ap.add_argument("--pretrain-steps", type=int, default=3000,
                    help="length of the pretraining schedule; set it to what fits in --pretrain-time, so the "
                         "learning rate decays fully")
    ap.add_argument("--batch-size", type=int, default=16, help="pretraining sequences per step (default: 16)")
    ap.add_argument("--lr", type=float, default=3e-3, help="pretraining peak learning rate (default: 3e-3)")
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="muon",
                    help="pretraining optimizer (default: muon, a little lower loss per step than adamw here)")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT optimizer steps (default: 300)")
    ap.add_argument("--sft-time", type=float, default=170, help="SFT seconds at most (default: 170)")
    ap.add_argument("--sft-lr", type=float, default=1e-3, help="SFT peak learning rate (default: 1e-3)")
    ap.add_argument("--n", type=int, default=200, help="held-out questions to ask (default: 200)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every stage (OMP_NUM_THREADS); default: 1 when other work already "
                         "holds a core (1-minute load average >= 1), else one per core")
    args = ap.parse_args()
    threads = args.threads or pick_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    print(f"torch threads: {threads} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)
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
    run([exe, "train", "--corpus", str(corpus), "--tokenizer", "char", *MODEL_FLAGS,
         "--batch-size", str(args.batch_size), "--max-steps", str(args.pretrain_steps),
         "--max-time", str(args.pretrain_time), "--optimizer", args.optimizer, "--lr", str(args.lr),
         "--warmup-steps", "100", "--min-lr-ratio", "0.05", "--beta2", "0.99", "--weight-decay", "0.1",
         "--eval-interval", "1000", "--eval-batches", "10", "--log-interval", "100", "--dtype", "fp32",
         "--out", str(out / "pretrain"), "--force", "--no-progress"])
    times["pretrain"] = time.perf_counter() - start

    start = time.perf_counter()
    run([exe, "finetune", "sft", str(out / "pretrain"), "--data", str(chats), "--out", str(out / "sft"), "--force",
         "--max-steps", str(args.sft_steps), "--max-time", str(args.sft_time), "--batch-size", "32",
         "--lr", str(args.sft_lr), "--warmup-steps", str(min(20, args.sft_steps)), "--eval-interval", "200",
         "--eval-batches", "5", "--dtype", "fp32", "--no-progress"])
    times["sft"] = time.perf_counter() - start

    start = time.perf_counter()
    result = evaluate_exact_match(str(out / "sft"), n=args.n)
    times["eval"] = time.perf_counter() - start
    times["total"] = time.perf_counter() - overall

    print("\nexact match on held-out questions (greedy):")
    for kind, t in result["per_kind"].items():
        print(f"  {kind:<11} {t['correct']:>3}/{t['total']:<3} {t['accuracy']:6.1%}")
    for held_out, t in sorted(result["per_held_out"].items()):
        print(f"  {'new ' + held_out:<11} {t['correct']:>3}/{t['total']:<3} {t['accuracy']:6.1%}")
    print(f"  {'overall':<11} {result['correct']:>3}/{result['n']:<3} {result['accuracy']:6.1%}")
    for f in result["failures"][:5]:
        print(f"  wrong [{f['kind']}] {f['question']!r}: expected {f['expected']!r}, got {f['got']!r}")
    load = os.getloadavg()
    print("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items())
          + f"  (load average now {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
