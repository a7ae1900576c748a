"""Compiled decoding across a conversation: a graph for every cache length, or one per length.

    python benchmarks/compile_shapes.py --threads 2

A static KV cache keeps a decode step's shapes fixed within one answer, but each answer's cache
is as long as its prompt plus its answer, so the next turn of a chat, or the next request to a
server, brings a new length. ``compile_decode`` marks that length symbolic (``symbolic``: one
graph for every length). Without the mark (``fixed``: torch.compile's default), the step
compiles for the first length, again at the second (dynamo then makes the sizes that changed
symbolic), and not after.

For each way, in a fresh process with an empty inductor cache (what a user's first chat meets):
the wall time of each turn of a four-turn chat with SmolLM2-135M-Instruct ``--quantize int8
--compile`` (greedy, at most 48 new tokens a turn). Then the decode speed of the two compiled
steps in turns, in one process, at the first turn's length (where ``fixed`` runs its graph made
for that length): medians of --repeat rounds and the median of the per-round ratios; and the
same for a batch of 8 such prompts (3 rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch

from gptlab.inference import compiled_decode
from gptlab.inference.compiled_decode import compile_decode
from gptlab.inference.engine import Engine, SamplingParams
from gptlab.weights.load import load_checkpoint

from engine_decode import ours  # this folder is on sys.path when a benchmark runs

MODEL = "smollm2-135m-instruct"
TURNS = ["Hi! Can you help me plan a picnic?", "What food should I bring for four people?",
         "And what games could we play there?", "Thanks! Any tips if it rains?"]
WAYS = ("fixed", "symbolic")


@contextmanager
def length_fixed():
    """Decode steps in here do not mark the cache length symbolic: torch.compile's default."""
    mark = compiled_decode.length_is_symbolic
    compiled_decode.length_is_symbolic = lambda cache, mask: None
    try:
        yield
    finally:
        compiled_decode.length_is_symbolic = mark


def way_of(way: str):
    return length_fixed() if way == "fixed" else nullcontext()


def engine_for() -> Engine:
    engine = Engine(load_checkpoint(MODEL), quantize="int8")
    compile_decode(engine.model)
    return engine


def chat_turns(way: str, new: int) -> dict:
    """Each turn's prompt length, answer and wall time (prompt rendering, prefill and decoding)."""
    engine, messages, turns = engine_for(), [], []
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        start = time.perf_counter()
        ids = engine.chat_prompt(messages, new).ids
        with way_of(way):
            answer = "".join(engine.stream(ids, params))
        turns.append({"prompt": len(ids), "seconds": time.perf_counter() - start, "answer": answer})
        messages.append({"role": "assistant", "content": answer})
    return {"way": way, "turns": turns}


def in_fresh_process(way: str, new: int, threads: int) -> dict:
    """``chat_turns`` in a child process with an empty inductor cache of its own."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        out = subprocess.run([sys.executable, __file__, "--child", way, "--new", str(new), "--threads", str(threads)],
                             env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def speeds_in_turns(prompt: torch.Tensor, new: int, repeat: int) -> dict[str, list[float]]:
    engines = {way: engine_for() for way in WAYS}
    runs = {way: [] for way in WAYS}
    for n in range(repeat + 1):  # the first round compiles
        for way, engine in engines.items():
            with way_of(way):
                _, speed = ours(engine.model, prompt, new)  # tokens/s after the first, EOS ignored
            if n:
                runs[way].append(speed)
    return runs


def print_speeds(what: str, runs: dict[str, list[float]]) -> None:
    ratios = [d / s for d, s in zip(runs["symbolic"], runs["fixed"])]
    print(f"{what}, {len(ratios)} rounds in turns: fixed {statistics.median(runs['fixed']):.1f} tok/s, symbolic "
          f"{statistics.median(runs['symbolic']):.1f} tok/s, symbolic/fixed {statistics.median(ratios):.3f} "
          f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=48, help="most new tokens per chat turn (default 48)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(chat_turns(args.child, args.new)))
        return

    print(f"{MODEL} --quantize int8 --compile, {args.threads} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    chats = {way: in_fresh_process(way, args.new, args.threads) for way in WAYS}
    print("\nchat turns, each way in a fresh process with an empty inductor cache (wall seconds):")
    print(f"{'turn':>4} {'prompt tokens':>14} " + " ".join(f"{way:>10}" for way in WAYS))
    for n in range(len(TURNS)):
        print(f"{n + 1:>4} {chats['fixed']['turns'][n]['prompt']:>14} "
              + " ".join(f"{chats[way]['turns'][n]['seconds']:>10.1f}" for way in WAYS))
    print(" all " + " " * 15 + " ".join(f"{sum(t['seconds'] for t in chats[way]['turns']):>10.1f}" for way in WAYS))
    same = [a["answer"] == b["answer"] for a, b in zip(*(chats[way]["turns"] for way in WAYS))]
    print(f"answers equal in {sum(same)} of {len(same)} turns")

    ids = Engine(load_checkpoint(MODEL)).chat_prompt([{"role": "user", "content": TURNS[0]}], args.new).ids
    print()
    print_speeds(f"decode at the first turn's length ({len(ids)}-token prompt, {args.new} new)",
                 speeds_in_turns(torch.tensor([ids]), args.new, args.repeat))
    print_speeds(f"a batch of 8 such prompts ({args.new} new)", speeds_in_turns(torch.tensor([ids] * 8), args.new, 3))


if __name__ == "__main__":
    main()
