"""Token shards: a corpus encoded once into flat binary arrays that training reads by memmap.

A prepared dataset is a directory:
- ``train.bin``, ``val.bin``: token ids back to back, ``uint16`` when the vocabulary fits in
  65,536 ids, else ``uint32`` (little endian);
- ``tokenizer.json``: the tokenizer that produced them;
- ``meta.json``: dtype, token/character/byte counts, the tokenizer, and the sha256 of every
  source, so the data can be traced and a re-run with the same inputs reuses it.

The split is by position in the text: the last ``val_fraction`` of the characters is the
validation set, cut at a line break near that point, so it is deterministic and a model is
validated on text it has never seen (a later part of the corpus, not shuffled lines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.cache import atomic_dir, recover_dir, sha256_bytes, write_json
from gptlab.data.sources import Corpus, load_corpus
from gptlab.errors import UserError
from gptlab.tokenizers import Tokenizer, build_tokenizer, load_tokenizer_file

FORMAT_VERSION = 1
#: encode in pieces of about this many characters so long corpora show progress
ENCODE_PIECE_CHARS = 1 << 20


@dataclass
class PreparedData:
    """A prepared dataset directory and its metadata."""

    path: Path
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.memmap:
        """The ids of ``split`` ("train" or "val") as a read-only memmap."""
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer_file(self.path / "tokenizer.json")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def split_point(text: str, val_fraction: float) -> int:
    """Character index where validation starts: the line break nearest the exact fraction."""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.find("\n", cut)
    # Keep the cut within 1% of the requested place; otherwise cut mid-line.
    return nl + 1 if nl != -1 and nl + 1 - cut <= max(1, len(text) // 100) else cut


def _pieces(text: str, size: int = ENCODE_PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters for progress reporting.

    Cuts fall just after a newline that sits between two non-space characters. The
    pre-tokenisation patterns of GPT-2 and GPT-4 never join text across such a newline into
    one chunk, so encoding piece by piece gives exactly the ids of encoding the whole text.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        i = start + size
        while i < len(text) - 1 and not (text[i] == "\n" and not text[i - 1].isspace() and not text[i + 1].isspace()):
            i += 1
        if i >= len(text) - 1:
            break
        pieces.append(text[start:i + 1])
        start = i + 1
    pieces.append(text[start:])
    return pieces


def encode_text(tokenizer: Tokenizer, text: str, desc: str) -> np.ndarray:
    """Encode ``text`` (special-token strings as plain text) into an array of the right dtype."""
    dtype = dtype_for(tokenizer.vocab_size)
    pieces = _pieces(text)
    out = []
    with tqdm(total=len(text), unit="char", unit_scale=True, desc=desc, disable=len(pieces) < 2) as bar:
        for piece in pieces:
            out.append(np.asarray(tokenizer.encode(piece), dtype=dtype))
            bar.update(len(piece))
    return np.concatenate(out) if out else np.zeros(0, dtype=dtype)


def _inputs_key(corpus: Corpus, tokenizer_spec: str, val_fraction: float) -> dict:
    """What determines the output: equal keys mean the existing result can be reused."""
    spec_hash = None
    if Path(tokenizer_spec).is_file():
        spec_hash = sha256_bytes(Path(tokenizer_spec).read_bytes())
    return {"format": FORMAT_VERSION, "text_sha256": corpus.sha256, "tokenizer_spec": tokenizer_spec,
            "tokenizer_file_sha256": spec_hash, "val_fraction": val_fraction}


def load_prepared(path: str | Path) -> PreparedData:
    path = Path(path)
    recover_dir(path)  # a prepare killed between its two renames leaves the previous result as .NAME.old
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{path} is not a prepared dataset (no meta.json); create one with gptlab prepare")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is corrupt ({e}); delete {path} and run gptlab prepare again") from None
    data = PreparedData(path, meta)
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * data.dtype.itemsize
        if not f.is_file() or f.stat().st_size != expected:
            raise UserError(f"{f} is missing or has the wrong size (expected {expected} bytes); "
                            f"delete {path} and run gptlab prepare again")
    return data


def prepare(corpus_spec: str, tokenizer_spec: str, out: str | Path, val_fraction: float = 0.1,
            force: bool = False, errors: str = "strict") -> PreparedData:
    """Encode a corpus into ``out``; reuse ``out`` if it was prepared from the same inputs.

    ``char`` builds its vocabulary from the whole text (so validation has no unknown
    characters); ``bpe:N`` learns its merges from the training part only.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    out = Path(out)
    recover_dir(out)
    corpus = load_corpus(corpus_spec, errors=errors)
    if not corpus.text.strip():
        raise UserError(f"corpus {corpus_spec!r} is empty; give a corpus with text in it")
    key = _inputs_key(corpus, tokenizer_spec, val_fraction)

    if (out / "meta.json").is_file():
        try:
            existing = load_prepared(out)
        except UserError:
            existing = None
        if existing is not None and existing.meta.get("inputs") == key:
            print(f"reusing {out} (prepared earlier from the same corpus and tokenizer)")
            return existing
        if not force:
            raise UserError(f"{out} already holds a prepared dataset from other inputs; "
                            "choose another --out or pass --force to replace it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} exists and is not a prepared dataset; choose another --out or pass --force")

    cut = split_point(corpus.text, val_fraction)
    train_text, val_text = corpus.text[:cut], corpus.text[cut:]
    if len(train_text) < 2 or len(val_text) < 2:
        raise UserError(f"corpus {corpus_spec!r} has {len(corpus.text)} characters, too short to split into "
                        f"training and validation (--val-fraction {val_fraction}); give more text")
    tokenizer = build_tokenizer(tokenizer_spec, corpus.text if tokenizer_spec == "char" else train_text)
    train_ids = encode_text(tokenizer, train_text, "encode train")
    val_ids = encode_text(tokenizer, val_text, "encode val")

    # Build everything in a temporary sibling folder, then swap it in: an interrupted prepare
    # leaves either the old result or the new one, never a mixture.
    with atomic_dir(out) as tmp:
        for name, ids in (("train", train_ids), ("val", val_ids)):
            ids.tofile(tmp / f"{name}.bin")
        tokenizer.save(tmp / "tokenizer.json")
        meta = {
            "inputs": key,
            "corpus": corpus_spec,
            "sources": corpus.sources,
            "tokenizer": {"spec": tokenizer_spec, "type": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "sha256": sha256_bytes((tmp / "tokenizer.json").read_bytes())},
            "vocab_size": tokenizer.vocab_size,
            "dtype": train_ids.dtype.name,
            "train_tokens": int(train_ids.size),
            "val_tokens": int(val_ids.size),
            "train_chars": len(train_text),
            "val_chars": len(val_text),
            "train_bytes": len(train_text.encode("utf-8")),
            "val_bytes": len(val_text.encode("utf-8")),
        }
        write_json(tmp / "meta.json", meta)
    print(f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, vocabulary {tokenizer.vocab_size:,})")
    return PreparedData(out, meta)
