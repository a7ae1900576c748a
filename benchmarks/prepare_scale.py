"""``gptlab prepare`` at scale (issue 18): wall time, throughput and the peak memory of the whole
process tree (workers included) on a generated JSONL corpus, with GPT-2's vocabulary, against
tiktoken encoding the same documents in memory on one thread; then a projection for FineWeb-Edu's
10B-token sample.

    python benchmarks/prepare_scale.py                          # 100 and 400 MB, 1 and 2 workers
    python benchmarks/prepare_scale.py --sizes 400 --workers 2

The corpus is FineWeb-like: one JSON line per document, ``{"text": ...}``, documents of 1-8 KB
cut at random from the ``english`` corpus with a fixed seed (written once to
``--out``/corpus-NNNmb.jsonl). Each measurement is a subprocess, run in turns (tiktoken, then
each worker count, per size), so one machine's noise falls on all of them alike. Memory is the
sum of the proportional set size (PSS: a page shared by n processes counts 1/n in each) of the
command and all its descendants, sampled every 50 ms; the tiktoken figure is its process alone,
text included. Figures for RESULTS.md; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from gptlab.data.sources import load_corpus

#: FineWeb-Edu sample-10BT: about 10B GPT-2 tokens from about 45 GB of text (the issue's figure)
FINEWEB_TOKENS, FINEWEB_BYTES = 10e9, 45e9

TIKTOKEN_RUN = r"""
import json, sys, time, zipfile, hashlib, os
sys.path.insert(0, {benchmarks!r})
from encode_throughput import tiktoken_gpt2
import tempfile
enc = tiktoken_gpt2(__import__("pathlib").Path(tempfile.mkdtemp()))
docs = [json.loads(line)["text"] for line in open({corpus!r}, encoding="utf-8")]
t0 = time.perf_counter()
n = 0
for d in docs:
    n += len(enc.encode_ordinary(d)) + 1  # and the end-of-text token that joins documents
print(json.dumps({{"seconds": time.perf_counter() - t0, "tokens": n - 1}}))
"""


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    """Documents of 1-8 KB drawn from ``english`` until the file holds ``megabytes`` MB."""
    if path.is_file():
        return path
    text = load_corpus("english").text
    rng, target, written = random.Random(seed), megabytes * 1_000_000, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            start = rng.randrange(len(text) - 8192)
            line = json.dumps({"text": text[start:start + rng.randint(1024, 8192)]}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    tmp.rename(path)
    return path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kb(pid)
        todo.extend(kids.get(pid, []))
    return total / 1024


def measured(cmd: list[str]) -> dict:
    """Run ``cmd``; its wall time, peak PSS of its process tree, and its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with exit status {proc.returncode}")
    return {"wall": time.perf_counter() - t0, "peak_mb": peak[0], "stdout": out}


def gptlab_prepare(corpus: Path, out: Path, workers: int) -> dict:
    gptlab = str(Path(sys.executable).with_name("gptlab"))
    shutil.rmtree(out, ignore_errors=True)  # a finished preparation of the same inputs is reused, even with --force
    r = measured([gptlab, "prepare", "--corpus", str(corpus), "--tokenizer", "gpt2", "--out", str(out),
                  "--workers", str(workers), "--force", "--val-fraction", "0.001"])
    meta = json.loads((out / "meta.json").read_text())
    r["tokens"] = meta["train_tokens"] + meta["val_tokens"]
    r["shards"] = sum(len(v) for v in meta["shards"].values())
    return r


def tiktoken_encode(corpus: Path) -> dict:
    script = TIKTOKEN_RUN.format(benchmarks=str(Path(__file__).resolve().parent), corpus=str(corpus))
    r = measured([sys.executable, "-c", script])
    r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 400], help="corpus sizes in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="runs/prepare-scale")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; GPT-2 vocabulary; "
          "prepare = the whole command (start-up, reading, encoding, writing shards)")
    print(f"{'corpus':>8} {'engine':<22} {'wall s':>7} {'MB/s':>6} {'Mtok/s':>7} {'peak MB':>8} {'vs tiktoken':>11}")
    rates = {}
    for mb in args.sizes:
        corpus = make_corpus(out / f"corpus-{mb}mb.jsonl", mb)
        size = corpus.stat().st_size / 1e6
        base = tiktoken_encode(corpus)
        print(f"{size:>6.0f}MB {'tiktoken, 1 thread':<22} {base['seconds']:>7.1f} {size / base['seconds']:>6.2f} "
              f"{base['tokens'] / base['seconds'] / 1e6:>7.3f} {base['peak_mb']:>8.0f} {'1.00x':>11}", flush=True)
        for w in args.workers:
            r = gptlab_prepare(corpus, out / f"prepared-{mb}mb-{w}w", w)
            same = "" if r["tokens"] == base["tokens"] else f" (tokens {r['tokens']:,} vs {base['tokens']:,})"
            print(f"{size:>6.0f}MB {f'gptlab, {w} worker' + ('s' if w > 1 else ''):<22} {r['wall']:>7.1f} "
                  f"{size / r['wall']:>6.2f} {r['tokens'] / r['wall'] / 1e6:>7.3f} {r['peak_mb']:>8.0f} "
                  f"{base['seconds'] / r['wall']:>10.2f}x{same}", flush=True)
            rates[w] = (size * 1e6 / r["wall"], r["tokens"] / size / 1e6)
    w = max(rates)
    bytes_per_s, tokens_per_byte = rates[w]
    hours = FINEWEB_BYTES / bytes_per_s / 3600
    print(f"\nFineWeb-Edu 10B (~{FINEWEB_BYTES / 1e9:.0f} GB of text, ~{FINEWEB_TOKENS / 1e9:.0f}B tokens): "
          f"{FINEWEB_TOKENS * 2 / 1e9:.0f} GB of uint16 shards; at {bytes_per_s / 1e6:.2f} MB/s with {w} workers here, "
          f"{hours:.1f} hours, {hours * w:.1f} core-hours ({FINEWEB_BYTES * tokens_per_byte / 1e9:.1f}B tokens at this "
          f"corpus's {tokens_per_byte:.3f} tokens per byte)")


if __name__ == "__main__":
    main()
