"""The book's chapter 6 on the real messages: SmolLM2-135M-Instruct becomes a spam classifier.

"Build a Large Language Model (From Scratch)" (Raschka), chapter 6, fine-tunes GPT-2 small on the
SMS Spam Collection: ham undersampled to the spam count, shuffled with a fixed seed, split
70/10/20 into train/validation/test, the last block, final norm and a new 2-class head trained;
95.67% test accuracy. This script does the same with ``gptlab finetune classify``'s Python API:

    python benchmarks/sms_spam_recipe.py                            # sms-spam, the book's split
    # (a): the model pretrained from scratch on `english` by benchmarks/chatbot_real_data.py:
    python benchmarks/sms_spam_recipe.py --model runs/chatbot-real/pretrain --train-last-blocks 4 \
        --out runs/recipe-sms-spam-scratch --max-steps 400 --lr 1e-3 --eval-interval 100
    # tweets, 3 classes, a seeded subsample (the run in RESULTS.md):
    python benchmarks/sms_spam_recipe.py --dataset tweet-sentiment --subsample 1600 200 600 --max-steps 200 --eval-interval 100

It fetches the dataset (``gptlab data fetch``), writes the split it trains on as JSONL into
``--out`` (``train.jsonl``, ``validation.jsonl``, ``test.jsonl``; ``test-unseen.jsonl``, the test
texts that do not also occur in training; ``split.json``, the counts), fine-tunes in
``--out/run`` and prints the accuracy and confusion matrix of the best checkpoint on each part,
with wall times; the figures also go to ``--out/results.json``.

sms-spam ignores the cache's own hash split: all 4,862 messages are pooled, as the book pools the
whole collection. tweet-sentiment keeps the cache's split (so no tweet of the test part is ever
trained on) and draws ``--subsample`` train/validation/test examples from it, stratified.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch

from gptlab.config import finetune_config
from gptlab.data.datasets import write_jsonl
from gptlab.data.sources import fetch_source
from gptlab.finetune.classify import confusion_of, format_report, load_classifier, read_labelled, run_classify
from gptlab.train.run import claim_out

BASE = "smollm2-135m-instruct"
Record = dict[str, str]


def read_split(files: dict[str, Path], split: str) -> list[Record]:
    return [json.loads(line) for line in files[f"{split}.jsonl"].read_text(encoding="utf-8").splitlines()]


def book_split(records: list[Record], seed: int) -> dict[str, list[Record]]:
    """Chapter 6's ``create_balanced_dataset`` and ``random_split``: every class undersampled to
    the rarest one's count, shuffled, then the first 70% train, the next 10% validation, the rest test."""
    # A canonical order first, so that the split depends on the seed only, not on the cache's files.
    records = sorted(records, key=lambda r: (r["label"], r["text"]))
    rng = random.Random(seed)
    by_label = {label: [r for r in records if r["label"] == label] for label in sorted({r["label"] for r in records})}
    n = min(len(rs) for rs in by_label.values())
    balanced = [r for rs in by_label.values() for r in (rs if len(rs) == n else rng.sample(rs, n))]
    rng.shuffle(balanced)
    train_end = int(len(balanced) * 0.7)
    val_end = train_end + int(len(balanced) * 0.1)
    return {"train": balanced[:train_end], "validation": balanced[train_end:val_end], "test": balanced[val_end:]}


def stratified_sample(records: list[Record], n: int, seed: int) -> list[Record]:
    """About ``n`` records keeping each label's share, in a seeded random order."""
    rng = random.Random(seed)
    labels = Counter(r["label"] for r in records)
    picked = []
    for label in sorted(labels):
        pool = [r for r in records if r["label"] == label]
        picked += rng.sample(pool, min(len(pool), round(n * labels[label] / len(records))))
    rng.shuffle(picked)
    return picked


def make_splits(dataset: str, subsample: tuple[int, int, int], seed: int) -> dict[str, list[Record]]:
    files = fetch_source(dataset)
    if dataset == "sms-spam":
        return book_split([r for s in ("train", "validation", "test") for r in read_split(files, s)], seed)
    return {split: stratified_sample(read_split(files, split), n, seed + i)
            for i, (split, n) in enumerate(zip(("train", "validation", "test"), subsample))}


def describe_splits(splits: dict[str, list[Record]]) -> dict[str, dict]:
    """Counts per split and label; the test part's majority-class accuracy (the label most frequent
    in training, always predicted); and how many test texts also occur verbatim in training (the
    collection repeats some messages, and the book's split does not remove them)."""
    counts = {s: dict(sorted(Counter(r["label"] for r in rs).items())) for s, rs in splits.items()}
    majority = Counter(r["label"] for r in splits["train"]).most_common(1)[0][0]
    test = splits["test"]
    return {"counts": counts, "majority_class": majority,
            "majority_test_accuracy": sum(r["label"] == majority for r in test) / len(test),
            "test_texts_also_in_train": len(test) - len(splits["test-unseen"])}


def evaluate(checkpoint: Path, out: Path, batch_size: int) -> dict[str, dict]:
    """Accuracy and confusion matrix of the checkpoint on each written split, with wall times."""
    classifier = load_classifier(checkpoint)
    figures = {}
    for split in ("train", "validation", "test", "test-unseen"):
        examples = read_labelled(out / f"{split}.jsonl", classifier.classes)
        start = time.perf_counter()
        matrix = confusion_of(classifier, examples, batch_size)
        took = time.perf_counter() - start
        correct = sum(matrix[i][i] for i in range(len(matrix)))
        figures[split] = {"accuracy": correct / len(examples), "matrix": matrix, "seconds": round(took, 1)}
        print(f"\n{split} ({took:.0f} s): {format_report(classifier.classes, matrix)}")
    return figures


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("sms-spam", "tweet-sentiment"), default="sms-spam")
    p.add_argument("--out", help="output folder (default: runs/recipe-DATASET)")
    p.add_argument("--force", action="store_true", help="replace a run already in OUT/run")
    p.add_argument("--subsample", type=int, nargs=3, default=(1200, 200, 600), metavar=("TRAIN", "VAL", "TEST"),
                   help="tweet-sentiment only: examples drawn from each split of the cache")
    p.add_argument("--seed", type=int, default=123, help="the split's seed (the book's random_state)")
    p.add_argument("--model", default=BASE, help=f"the base model: any MODEL gptlab takes (default: {BASE})")
    p.add_argument("--train-last-blocks", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=130)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-interval", type=int, default=65)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--dtype", default="fp32")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out or f"runs/recipe-{args.dataset}")
    claim_out(out / "run", args.force)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(args.dataset, tuple(args.subsample), args.seed)
    # The test texts never seen verbatim in training, for an accuracy that repeats cannot inflate.
    train_texts = {r["text"] for r in splits["train"]}
    splits["test-unseen"] = [r for r in splits["test"] if r["text"] not in train_texts]
    for split, records in splits.items():
        write_jsonl(out / f"{split}.jsonl", records)
    split_info = describe_splits(splits)
    (out / "split.json").write_text(json.dumps(split_info, indent=1) + "\n")
    print(f"{args.dataset}: {json.dumps(split_info)}")

    cfg = finetune_config("classify", {"max_steps": args.max_steps, "lr": args.lr, "batch_size": args.batch_size,
                                       "eval_interval": args.eval_interval, "eval_batches": args.eval_batches,
                                       "device": "cpu", "dtype": args.dtype})
    start = time.perf_counter()
    result = run_classify(args.model, out / "train.jsonl", out / "run", cfg, val_data=out / "validation.jsonl",
                          train_last_blocks=args.train_last_blocks, show_progress=False)
    train_seconds = time.perf_counter() - start
    figures = evaluate(result.checkpoint, out, batch_size=32)
    summary = {"dataset": args.dataset, "model": args.model, "args": vars(args), "split": split_info,
               "steps": result.run.step, "finetune_seconds": round(train_seconds, 1),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
               "figures": figures}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    accuracies = ", ".join(f"{s} {f['accuracy']:.2%}" for s, f in figures.items())
    print(f"\n{args.dataset}, {args.model}, last {args.train_last_blocks} blocks, {result.run.step} steps: {accuracies}; "
          f"majority class {split_info['majority_test_accuracy']:.2%} on test; fine-tuning {train_seconds:.0f} s "
          f"(with loading and the run's own evaluations), CPU {summary['cpu_capability']}, "
          f"{summary['threads']} threads")


if __name__ == "__main__":
    main()
