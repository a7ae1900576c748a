"""``gptlab eval --chat``: scoring every candidate reply after the whole context, against running
each context once into a KV cache and the candidates after it (``Scorer.share_prefixes``).

    python benchmarks/eval_shared_prefix.py                               # SmolLM2, 40 chitchat items
    python benchmarks/eval_shared_prefix.py --model runs/chatbot-real/sft --items 100

The items are held-out chitchat contexts as ``chatbot_real_data.py`` makes them (its
``chitchat-eval.jsonl`` when it is there, else the test split's first conversations cut to at
most 5 messages). Both ways run in turns, ``--repeat`` times each; the medians, their ratio and
the largest difference between the two ways' hits and reply bits per byte print together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gptlab.inference.eval_chat import ChatTemplate, evaluate_chat, read_dialogues
from gptlab.inference.eval_scoring import Scorer
from gptlab.tokenizers.chat_template import bos_id, chat_format
from gptlab.weights.load import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))


def held_out_file(items: int) -> Path:
    made = Path("runs/chatbot-real/chitchat-eval.jsonl")
    if made.exists():
        return made
    from chatbot_real_data import read_chats, reply_items
    from gptlab.data.datasets import write_jsonl

    path = Path("runs/eval-shared-prefix.jsonl")
    path.parent.mkdir(exist_ok=True)
    write_jsonl(path, reply_items(read_chats("chitchat", "test"), max(items, 20), 5, 400, 0))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.model)
    dialogues = read_dialogues(held_out_file(args.items))
    chat = ChatTemplate(*chat_format(ckpt))
    print(f"{args.model}: {args.items} items x {args.k} candidates, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}", flush=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for _ in range(args.repeat):
        for share in (False, True):
            scorer = Scorer(ckpt.model, torch.device("cpu"), torch.float32, args.batch_size, progress=False,
                            bos_id=bos_id(ckpt), share_prefixes=share)
            start = time.perf_counter()
            results[share] = evaluate_chat(scorer, ckpt.tokenizer, chat, dialogues, args.k, limit=args.items)
            times[share].append(time.perf_counter() - start)
    for share, label in ((False, "every candidate after the whole context"), (True, "context once, KV cache")):
        r = results[share]
        print(f"{label:<40} median {statistics.median(times[share]):6.1f} s  hits@1 {r.hits_at_1:.3f}  "
              f"per char {r.hits_at_1_norm:.3f}  reply bits/byte {r.reply_bits_per_byte:.5f}")
    print(f"speed-up {statistics.median(times[False]) / statistics.median(times[True]):.2f}x; "
          f"bits/byte differ by {abs(results[True].reply_bits_per_byte - results[False].reply_bits_per_byte):.2e}")
    print(json.dumps({str(k): v for k, v in times.items()}))


if __name__ == "__main__":
    main()
