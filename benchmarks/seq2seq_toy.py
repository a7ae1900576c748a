"""The original encoder-decoder Transformer learns a toy task on this CPU in about a minute.

    python benchmarks/seq2seq_toy.py [--task reverse|sort] [--max-len 8] [--max-steps 600]
                                     [--threads 1] [--out runs/seq2seq-toy]

Trains ``gptlab.model.seq2seq.Seq2SeqTransformer`` (2 encoder + 2 decoder layers, width 64) with
the one training loop on random digit strings, then prints the greedy exact-match accuracy on
held-out inputs (never trained on), the wall time, the CPU load while it ran and a few answers.
One thread by default: on 2 shared cores, two threads waiting on each other ran a step of this
small model about 15 times slower than one thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch

from gptlab.config import TrainConfig
from gptlab.data import toy
from gptlab.train import toy_seq2seq
from gptlab.model.seq2seq import Seq2SeqConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="reverse", choices=sorted(toy.TASKS))
    parser.add_argument("--max-len", type=int, default=8, help="longest input, in digits")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/seq2seq-toy")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    task = toy.ToyTask(args.task, 1, args.max_len)
    model_cfg = Seq2SeqConfig(block_size=task.max_target_len, n_layer=2, n_head=4, n_embd=64)
    cfg = TrainConfig(batch_size=64, max_steps=args.max_steps, lr=2e-3, warmup_steps=min(100, args.max_steps // 10),
                      weight_decay=0.0, beta2=0.98, eval_interval=max(1, args.max_steps // 4), eval_batches=4,
                      log_interval=50, device="cpu", dtype="fp32")
    shutil.rmtree(args.out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    model, result = toy_seq2seq.train_seq2seq(task, model_cfg, cfg, args.out)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    model.eval()
    held_out = task.draw(2000, "val", torch.Generator().manual_seed(12345))
    accuracy = toy_seq2seq.exact_match(model, task, held_out)
    print(f"\ntask: {task.name} {task.min_len}-{task.max_len} digits, {model.num_parameters():,} parameters, "
          f"{result.step} steps of {cfg.batch_size} examples")
    print(f"train wall time: {wall:.1f} s on {args.threads} thread(s); 1-minute load average "
          f"{load_before:.2f} before, {load_after:.2f} after ({os.cpu_count()} cores)")
    print(f"held-out exact match (greedy): {result.last_eval['val_accuracy']:.1%} on the loop's 500, "
          f"{accuracy:.1%} on 2,000 fresh held-out inputs")
    answers = model.greedy_decode(task.batch(held_out[:5])[0], toy.BOS, toy.EOS, task.max_target_len).tolist()
    for src, answer in zip(held_out[:5], answers):
        print(f"  {toy.decode(src):>{task.max_len}} -> {toy.decode(answer)}")


if __name__ == "__main__":
    main()
