"""Where a model's hits@1 (``gptlab eval --chat``) comes from: the same candidates and scores,
broken down by what decides them.

    python benchmarks/chat_eval_breakdown.py runs/chatbot-real/sft smollm2-135m-instruct
    python benchmarks/chat_eval_breakdown.py runs/chatbot-real/pretrain runs/chatbot-real/sft \\
        --chat runs/chat-breakdown/val2000.jsonl          # made by --make-val 2000 (validation split)

A summed log-likelihood favours short replies whatever the context, and the candidates are the
real replies of other conversations, whose lengths vary by tens of characters. So for each model
the table gives, beside hits@1: how often its top candidate is simply the shortest one; its
hits@1 on the items whose true reply is the shortest of the K (where length helps it) and on the
others (where only the context can lift the true reply above a shorter one); and hits@1 by how
many messages of context the item has (1: the opening reply of a conversation). Without a
context signal a model scores chance on every row, whatever its length prior.

Each model's scores are kept in ``--out`` (one JSON per model and file), so a model is scored once.
``--make-val N`` writes N held-out items of chitchat's validation split, made as
``chatbot_real_data.py`` makes its test items: a larger set for comparing recipes without
looking at the test items.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

from gptlab.inference.eval_chat import ChatTemplate, is_hit, read_dialogues, score_candidates
from gptlab.inference.eval_scoring import Scorer
from gptlab.tokenizers.chat_template import bos_id, chat_format
from gptlab.weights.load import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_CHAT = Path("runs/chatbot-real/chitchat-eval.jsonl")


def scores_of(model: str, chat_file: Path, k: int, out: Path) -> dict:
    """``{"hits", "lengths", "context"}`` per item for ``model`` on ``chat_file`` (cached in ``out``)."""
    key = hashlib.sha256(f"{Path(model).resolve() if Path(model).exists() else model}|{chat_file.resolve()}|{k}"
                         .encode()).hexdigest()[:16]
    cached = out / f"{Path(model).name}-{chat_file.stem}-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    ckpt = load_checkpoint(model)
    scorer = Scorer(ckpt.model, torch.device("cpu"), torch.float32, 16, progress=True, bos_id=bos_id(ckpt))
    scores = score_candidates(scorer, ckpt.tokenizer, ChatTemplate(*chat_format(ckpt)), read_dialogues(chat_file), k)
    result = {"logliks": scores.logliks,
              "lengths": [[len(c.reply) for c in group] for group in scores.candidates],
              "context": [len(d.context) for d in scores.items]}
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def rate(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.3f} ({len(flags)})" if flags else "-"


def breakdown(result: dict) -> dict[str, str]:
    hits = [is_hit(v) for v in result["logliks"]]
    true_shortest = [lengths[0] < min(lengths[1:]) for lengths in result["lengths"]]
    top_is_shortest = [max(range(len(v)), key=v.__getitem__) == min(range(len(n)), key=n.__getitem__)
                       for v, n in zip(result["logliks"], result["lengths"])]
    depth = {"1": lambda n: n == 1, "2-3": lambda n: 2 <= n <= 3, "4-5": lambda n: n >= 4}
    row = {"hits@1": rate(hits), "top = shortest": rate(top_is_shortest),
           "true shortest": rate([h for h, s in zip(hits, true_shortest) if s]),
           "true not shortest": rate([h for h, s in zip(hits, true_shortest) if not s])}
    for name, test in depth.items():
        row[f"context {name}"] = rate([h for h, n in zip(hits, result["context"]) if test(n)])
    return row


def make_val(n: int, out: Path) -> Path:
    from chatbot_real_data import read_chats, reply_items

    from gptlab.data.datasets import write_jsonl

    path = out / f"val{n}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, reply_items(read_chats("chitchat", "validation"), n, 5, 400, 1))
    print(f"{path}: {n} items of chitchat's validation split")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="MODEL arguments, as gptlab eval takes them")
    ap.add_argument("--chat", type=Path, default=DEFAULT_CHAT, help=f"held-out items (default: {DEFAULT_CHAT})")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/chat-breakdown"))
    ap.add_argument("--make-val", type=int, metavar="N", help="write N validation items into --out and use them")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chat_file = make_val(args.make_val, args.out) if args.make_val else args.chat
    print(f"{chat_file}, K = {args.k} (chance {1 / args.k:.3f}); {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; rates with their item counts")
    rows = {model: breakdown(scores_of(model, chat_file, args.k, args.out)) for model in args.models}
    if not rows:
        return
    columns = list(next(iter(rows.values())))
    width = max(len(m) for m in rows)
    print(f"{'model':<{width}}  " + "  ".join(f"{c:>17}" for c in columns))
    for model, row in rows.items():
        print(f"{model:<{width}}  " + "  ".join(f"{row[c]:>17}" for c in columns))


if __name__ == "__main__":
    main()
