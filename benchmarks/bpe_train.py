"""Time BPE training: gptlab's pure-Python trainer against Hugging Face ``tokenizers`` (Rust).

Both learn a byte-level BPE of the same vocabulary size on the complete works of Shakespeare
(~5 MB) with GPT-2's pre-tokenisation. Prints the median of ``--repeat`` runs of each.

    python benchmarks/bpe_train.py [--vocab-size 8192] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from gptlab.data.sources import load_corpus
from gptlab.tokenizers import BPETokenizer
from gptlab.tokenizers.bpe import parse_token


def train_ours(text: str, vocab_size: int) -> set[bytes]:
    tok = BPETokenizer.train(text, vocab_size, progress=False)
    return set(tok.ranks)


def train_hf(text: str, vocab_size: int) -> set[bytes]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # One item, so that HF pre-tokenises exactly the same text as we do.
    tok.train_from_iterator([text], trainer)
    # HF spells tokens with GPT-2's byte-to-character table, as our JSON does.
    return {parse_token(t) for t in tok.get_vocab()}


def timed(fn, *args) -> tuple[float, set[bytes]]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    text = load_corpus("shakespeare").text
    print(f"corpus: shakespeare, {len(text.encode('utf-8')) / 1e6:.2f} MB; vocab size {args.vocab_size}; "
          f"median of {args.repeat} runs")
    results = {}
    for name, fn in [("gptlab (pure Python)", train_ours), ("HF tokenizers (Rust)", train_hf)]:
        times = []
        for _ in range(args.repeat):
            seconds, vocab = timed(fn, text, args.vocab_size)
            times.append(seconds)
        results[name] = (statistics.median(times), vocab)
        print(f"{name:22s} {statistics.median(times):7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times)})")
    (ours, ours_vocab), (hf, hf_vocab) = results.values()
    print(f"ratio gptlab / HF: {ours / hf:.1f}x")
    print(f"tokens in both vocabularies: {len(ours_vocab & hf_vocab)} of {len(ours_vocab)}")


if __name__ == "__main__":
    main()
