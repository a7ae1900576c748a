"""Token shards: a corpus encoded once, streamed and in parallel, into files training memory-maps.

A prepared dataset is a directory:
- the shards of ids, ``train.bin`` and ``val.bin`` for a small corpus, ``train-000000.bin``, ...
  beyond ``shard_tokens`` ids (100M by default; ``gptlab.data.shards``);
- ``tokenizer.json``: the tokenizer that produced them;
- ``meta.json``: the shards of each split in order with their token counts
  (``"shards": {"train": [{"path": "train.bin", "tokens": 901234}], "val": [...]}``), the
  dtype, token/character/byte/document counts, the tokenizer and the document separator, and
  the sha256 of every source, so the data can be traced and a re-run with the same inputs
  reuses it.

How it is made, never holding the corpus or its ids in memory:
1. Read the corpus once (``survey``): count its documents and characters (and, for ``char``,
   collect its characters); refuse it if it is empty or only whitespace.
2. Build the tokenizer: ``char`` from every character of the corpus (validation has no unknown
   characters); ``bpe:N`` learns its merges from the training part only, which is read into
   memory for that (for a corpus larger than memory, train a tokenizer on a part of it with
   ``gptlab tokenizer train`` and give its file).
3. Read it again as numbered tasks (``gptlab.data.pieces``: the split, document breaks, pieces),
   encode them in ``workers`` processes (``gptlab.data.encoder_pool``) and write the ids, in
   task order, into shards. Documents are joined with the tokenizer's end-of-text token, as
   nanoGPT and llm.c do, so the model sees where one text ends and the next begins; a tokenizer
   without one (``char``) joins them with a blank line, which it can spell.

The work happens in ``.OUT.partial`` next to ``OUT``. It keeps every finished shard: after
Ctrl-C, kill -9 or a full disk, the same command again continues from the last finished shard.
The finished dataset replaces ``OUT`` whole (``gptlab.cache.atomic_dir``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.cache import atomic_dir, atomic_write_json, recover_dir, sha256_bytes, write_json
from gptlab.data import pieces
from gptlab.data.encoder_pool import TEXT_SEPARATOR, available_cores, encode_in_order, separator_ids
from gptlab.data.pieces import encode_tasks, split_blocks, split_point, val_documents
from gptlab.data.shards import DEFAULT_SHARD_TOKENS, PROGRESS, SPLITS, Progress, ShardWriter, dtype_for, is_disk_full
from gptlab.data.sources import CorpusStream, open_corpus
from gptlab.errors import UserError
from gptlab.tokenizers import Tokenizer, build_tokenizer, load_tokenizer_file

__all__ = ["PreparedData", "dtype_for", "load_prepared", "prepare", "split_point"]

FORMAT_VERSION = 2
INPUTS = "inputs.json"  # in the work folder: what it is preparing, and what the survey found
#: show a progress bar for corpora of more than this many bytes
PROGRESS_BYTES = 4 << 20


@dataclass
class PreparedData:
    """A prepared dataset directory and its metadata."""

    path: Path
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def shard_list(self, split: str) -> list[dict]:
        """``[{"path": ..., "tokens": ...}]`` of ``split``; a dataset prepared before shards had one file each."""
        if "shards" in self.meta:
            return self.meta["shards"][split]
        return [{"path": f"{split}.bin", "tokens": self.meta[f"{split}_tokens"]}]

    def shards(self, split: str) -> list[np.memmap]:
        """The shards of ``split`` ("train" or "val"), in order, as read-only memmaps."""
        return [np.memmap(self.path / s["path"], dtype=self.dtype, mode="r") for s in self.shard_list(split)]

    def tokens(self, split: str) -> np.ndarray:
        """All ids of ``split``: a memmap when it is one shard, else read into memory (training
        reads ``shards`` instead)."""
        shards = self.shards(split)
        return shards[0] if len(shards) == 1 else np.concatenate(shards)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer_file(self.path / "tokenizer.json")


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
    for split in SPLITS:
        for shard in data.shard_list(split):
            f, expected = path / shard["path"], shard["tokens"] * data.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise UserError(f"{f} is missing or has the wrong size (expected {expected} bytes); "
                                f"delete {path} and run gptlab prepare again")
    return data


# --- step 1: the survey ------------------------------------------------------------------------

@dataclass
class Survey:
    """What one read of the corpus found."""

    documents: int
    chars: int  # 0 when not surveyed (a streamed dataset that declares its size)
    bytes: int
    characters: str = ""  # every distinct character, for a char tokenizer


def survey(stream: CorpusStream, collect_characters: bool) -> Survey:
    """Count the documents, characters and bytes; refuse an empty or whitespace-only corpus."""
    n = chars = n_bytes = 0
    seen: set[str] = set()
    has_text = False
    for doc in stream.documents():
        n += 1
        for block in doc:
            chars += len(block)
            n_bytes += len(block.encode("utf-8"))
            has_text = has_text or not block.isspace()
            if collect_characters:
                seen.update(block)
    if not has_text:
        raise UserError(f"corpus {stream.spec!r} is empty (no text, or only whitespace); give a corpus with text in it")
    return Survey(n, chars, n_bytes, "".join(sorted(seen)))


def _survey_unless_declared(stream: CorpusStream, tokenizer_spec: str) -> Survey:
    """A streamed dataset that declares its number of rows is not read twice (unless char needs
    its characters); anything else is surveyed."""
    declared = stream.known_documents()
    if declared and declared > 1 and tokenizer_spec != "char":
        return Survey(declared, 0, 0)
    return survey(stream, collect_characters=tokenizer_spec == "char")


# --- step 2: the tokenizer ------------------------------------------------------------------------

def _training_text(stream: CorpusStream, found: Survey, val_fraction: float) -> str:
    """The training part of the corpus as one text, its documents joined with a blank line."""
    parts: list[str] = []
    last = None
    for split, number, block in split_blocks(stream.documents(), found.documents, found.chars, val_fraction):
        if split != "train":
            break
        if last is not None and number != last:
            parts.append(TEXT_SEPARATOR)
        parts.append(block)
        last = number
    return "".join(parts)


def _build_tokenizer(spec: str, stream: CorpusStream, found: Survey, val_fraction: float) -> Tokenizer:
    if spec == "char":  # every character of the corpus, and the blank line that joins its documents
        extra = TEXT_SEPARATOR if found.documents > 1 else ""
        return build_tokenizer(spec, found.characters + extra)
    return build_tokenizer(spec, lambda: _training_text(stream, found, val_fraction))


# --- the work folder: start it, or continue it ------------------------------------------------------

def _inputs_key(sources: list[dict], tokenizer_spec: str, val_fraction: float, errors: str, text_column: str,
                shard_tokens: int) -> dict:
    """What determines the output: equal keys mean an existing result (or half of one) can be reused."""
    spec_hash = None
    if Path(tokenizer_spec).is_file():
        spec_hash = sha256_bytes(Path(tokenizer_spec).read_bytes())
    return {"format": FORMAT_VERSION, "sources_sha256": sha256_bytes(json.dumps(sources, sort_keys=True).encode()),
            "tokenizer_spec": tokenizer_spec, "tokenizer_file_sha256": spec_hash, "val_fraction": val_fraction,
            "errors": errors, "text_column": text_column, "shard_tokens": shard_tokens}


def _task_sizes() -> list[int]:
    """What numbers the tasks besides the text: progress.json's task numbers hold only with these."""
    return [pieces.TASK_CHARS, pieces.PIECE_CHARS]


def _continue_work(work: Path, key: dict) -> tuple[Survey, Tokenizer, Progress] | None:
    """The work folder's state if it is preparing the same inputs (stray files removed), else None."""
    try:
        recorded = json.loads((work / INPUTS).read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("inputs") != key or recorded.get("tasks") != _task_sizes():
        return None
    progress = Progress.read(work)
    keep = {INPUTS, "tokenizer.json", PROGRESS} | {s["path"] for split in SPLITS for s in progress.shards[split]}
    for f in work.iterdir():
        if f.name not in keep:  # an unfinished shard, or one finished after progress.json was last written
            f.unlink()
    done = sum(len(progress.shards[s]) for s in SPLITS)
    print(f"continuing the preparation in {work}: {done} shard{'s' if done != 1 else ''} already written",
          file=sys.stderr)
    return Survey(**recorded["survey"]), load_tokenizer_file(work / "tokenizer.json"), progress


def _start_work(work: Path, key: dict, stream: CorpusStream, tokenizer_spec: str,
                val_fraction: float) -> tuple[Survey, Tokenizer, Progress]:
    """A fresh work folder: survey the corpus, build and save the tokenizer."""
    found = _survey_unless_declared(stream, tokenizer_spec)
    tokenizer = _build_tokenizer(tokenizer_spec, stream, found, val_fraction)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tokenizer.save(work / "tokenizer.json")
    # Written last: its presence says the folder is set up.
    atomic_write_json(work / INPUTS, {"inputs": key, "tasks": _task_sizes(),
                                      "survey": asdict(found) | {"characters": ""}})
    return found, tokenizer, Progress()


def _reusable(out: Path, key: dict, force: bool) -> PreparedData | None:
    """The dataset already in ``out`` if it was prepared from the same inputs; refuse to replace
    anything else there without ``force``."""
    if (out / "meta.json").is_file():
        try:
            existing = load_prepared(out)
        except UserError:
            existing = None
        if existing is not None and existing.meta.get("inputs") == key:
            return existing
        if not force:
            raise UserError(f"{out} already holds a prepared dataset from other inputs; "
                            "choose another --out or pass --force to replace it")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not a prepared dataset; choose another --out or pass --force")
    return None


def check_workers(workers: int | None) -> int:
    """``--workers``: 1 to the number of cores (the default)."""
    cores = available_cores()
    if workers is None:
        return cores
    if not 1 <= workers <= cores:
        raise UserError(f"--workers {workers}: give a number from 1 to {cores}, the cores this machine lets "
                        "gptlab use")
    return workers


# --- step 3: encode into shards -------------------------------------------------------------------

@dataclass
class Preparation:
    """One preparation: where it works, what it read, and how it encodes."""

    work: Path
    stream: CorpusStream
    found: Survey
    tokenizer: Tokenizer
    progress: Progress
    val_fraction: float
    shard_tokens: int
    workers: int
    done_bytes: int = 0  # of text whose ids are written (or were, before a restart)

    @property
    def dtype(self) -> np.dtype:
        return dtype_for(self.tokenizer.vocab_size)


def _encode(prep: Preparation, text_counts: dict[str, dict[str, int]], bar: tqdm) -> None:
    """Encode every task not yet in a finished shard and write it; ``text_counts`` gets the
    characters and bytes of each split (of every task, skipped ones included)."""
    tasks = encode_tasks(split_blocks(prep.stream.documents(), prep.found.documents, prep.found.chars,
                                      prep.val_fraction), prep.val_fraction)
    first, skip = prep.progress.next_task, prep.progress.skip_ids

    def todo():
        for task in tasks:
            text_counts[task.split]["chars"] += task.chars
            text_counts[task.split]["bytes"] += task.bytes
            if task.index >= first:
                yield task
            else:  # in a shard finished before a restart
                prep.done_bytes += task.bytes
                bar.update(task.bytes)

    writers = {split: ShardWriter(prep.work, split, prep.shard_tokens, prep.progress) for split in SPLITS}
    split, last, start, encoded = "train", -1, time.perf_counter(), 0
    try:
        for task, ids in encode_in_order(todo(), prep.work / "tokenizer.json", prep.dtype, prep.workers):
            if task.split != split:
                writers[split].finish(next_task=task.index)
                split = task.split
            writers[split].write(task.index, ids, skip if task.index == first else 0)
            last, encoded = task.index, encoded + len(ids)
            prep.done_bytes += task.bytes
            bar.update(task.bytes)
            bar.set_postfix_str(f"{encoded / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s", refresh=False)
        writers[split].finish(next_task=last + 1)
    finally:
        for writer in writers.values():
            writer.discard()  # an unfinished shard: none after a full run


def _disk_full(prep: Preparation, e: OSError) -> UserError:
    """What a full disk means for this preparation: how much more space it needs, about."""
    done = sum(prep.progress.tokens(s) for s in SPLITS)
    total_bytes = prep.found.bytes or prep.done_bytes  # a streamed dataset of unknown size: at least this
    needed = max(done / max(prep.done_bytes, 1) * total_bytes - done, 0) * prep.dtype.itemsize
    free = shutil.disk_usage(prep.work).free
    n_kept = sum(len(prep.progress.shards[s]) for s in SPLITS)
    return UserError(f"the disk holding {prep.work} is full ({e.strerror}): the remaining shards need about "
                     f"{needed / 1e6:,.1f} MB more and {free / 1e6:,.1f} MB are free; free some space and run the "
                     f"same command again to continue (the {n_kept} finished shards are kept)")


def _run(prep: Preparation, show_progress: bool) -> dict[str, dict[str, int]]:
    """Encode everything, with a progress bar (MB/s of text, tokens/s over all workers)."""
    text_counts = {split: {"chars": 0, "bytes": 0} for split in SPLITS}
    show = show_progress and (prep.found.bytes == 0 or prep.found.bytes > PROGRESS_BYTES)
    with tqdm(total=prep.found.bytes or None, unit="B", unit_scale=True, desc=f"encode ({prep.workers} workers)",
              disable=not show, dynamic_ncols=True) as bar:
        try:
            _encode(prep, text_counts, bar)
        except OSError as e:
            if is_disk_full(e):
                raise _disk_full(prep, e) from None
            raise
        except KeyboardInterrupt:
            print(f"\nstopped; the same command continues from the finished shards in {prep.work}", file=sys.stderr)
            raise
    return text_counts


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the finished folder shares the shards' bytes: no copy, no extra space
    except OSError:
        shutil.copyfile(src, dst)


def _meta(prep: Preparation, key: dict, spec: str, sources: list[dict], text_counts: dict) -> dict:
    tok, separator = prep.tokenizer, separator_ids(prep.tokenizer)
    n_val = val_documents(prep.found.documents, prep.val_fraction) if prep.found.documents > 1 else 1
    return {
        "format": FORMAT_VERSION, "inputs": key, "corpus": spec, "sources": sources,
        "tokenizer": {"spec": key["tokenizer_spec"], "type": tok.kind, "vocab_size": tok.vocab_size,
                      "sha256": sha256_bytes((prep.work / "tokenizer.json").read_bytes()),
                      "separator": {"ids": separator, "text": tok.decode(separator)}},
        "vocab_size": tok.vocab_size, "dtype": prep.dtype.name,
        # a corpus of one document has it in both splits, cut in its text
        "documents": {"train": max(prep.found.documents - n_val, 1), "val": n_val},
        **{f"{s}_tokens": prep.progress.tokens(s) for s in SPLITS},
        **{f"{s}_{unit}": text_counts[s][unit] for unit in ("chars", "bytes") for s in SPLITS},
        "shard_tokens": prep.shard_tokens, "shards": prep.progress.shards,
    }


def _finish(prep: Preparation, out: Path, meta: dict) -> PreparedData:
    """Put the finished dataset in place of ``out`` (whole), then drop the work folder."""
    with atomic_dir(out) as tmp:
        for name in [s["path"] for split in SPLITS for s in prep.progress.shards[split]] + ["tokenizer.json"]:
            _link_or_copy(prep.work / name, tmp / name)
        write_json(tmp / "meta.json", meta)
    shutil.rmtree(prep.work, ignore_errors=True)
    n_shards = sum(len(v) for v in meta["shards"].values())
    in_shards = f" in {n_shards} shards" if n_shards > 2 else ""
    print(f"wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens "
          f"({meta['dtype']}, vocabulary {prep.tokenizer.vocab_size:,}){in_shards}")
    return PreparedData(out, meta)


def prepare(corpus_spec: str, tokenizer_spec: str, out: str | Path, val_fraction: float = 0.1,
            force: bool = False, errors: str = "strict", workers: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, text_column: str = "text",
            show_progress: bool = True) -> PreparedData:
    """Encode a corpus into ``out`` (see the module docstring); reuse ``out`` if it was prepared
    from the same inputs, and continue an interrupted preparation of them.

    ``workers``: encoding processes, 1 to the number of cores (default: all of them).
    ``shard_tokens``: ids per shard. ``text_column``: the field of JSONL, Parquet or ``hf:`` rows
    that holds the text. ``errors="replace"`` turns invalid UTF-8 into U+FFFD instead of failing.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")
    workers = check_workers(workers)
    out = Path(out)
    recover_dir(out)
    stream = open_corpus(corpus_spec, errors, text_column)
    sources = stream.sources()
    key = _inputs_key(sources, tokenizer_spec, val_fraction, errors, text_column, shard_tokens)
    existing = _reusable(out, key, force)
    if existing is not None:
        print(f"reusing {out} (prepared earlier from the same corpus and tokenizer)")
        return existing
    work = out.with_name(f".{out.name}.partial")
    found, tokenizer, progress = (_continue_work(work, key)
                                  or _start_work(work, key, stream, tokenizer_spec, val_fraction))
    n_tasks = math.ceil(found.chars / pieces.TASK_CHARS) if found.chars else workers
    prep = Preparation(work, stream, found, tokenizer, progress, val_fraction, shard_tokens, max(1, min(workers, n_tasks)))
    text_counts = _run(prep, show_progress)
    return _finish(prep, out, _meta(prep, key, corpus_spec, sources, text_counts))
