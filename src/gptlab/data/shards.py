"""Token shards on disk: written a fixed number of tokens at a time, each file whole or absent.

A split's ids are cut into shards of ``shard_tokens`` ids (the last one shorter). A split that
fits in one shard is the one file ``train.bin`` or ``val.bin``, as small datasets always were;
a longer one is ``train-000000.bin``, ``train-000001.bin``, ... Ids are ``uint16`` when the
vocabulary fits in 65,536 ids, else ``uint32``, little endian, back to back, no header: a shard
is read with ``np.memmap``.

A shard grows in ``SPLIT.part`` and becomes its ``.bin`` by a rename once it is full (or its
split ends) and flushed to disk, so a ``.bin`` is always complete. After each one,
``progress.json`` records the finished shards and where the next one starts: at which task
(``gptlab.data.pieces``) and how many of that task's ids the finished shards already hold.
A preparation killed at any moment therefore restarts from its last finished shard.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptlab.cache import atomic_write_json

PROGRESS = "progress.json"
DEFAULT_SHARD_TOKENS = 100_000_000
SPLITS = ("train", "val")


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int, only: bool) -> str:
    return f"{split}.bin" if only else f"{split}-{index:06d}.bin"


@dataclass
class Progress:
    """What a preparation has finished: its shards, and where the next shard's ids start."""

    #: split -> [{"path": file name, "tokens": count}], in order
    shards: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    #: the task the next shard starts in, and how many of its ids are already in finished shards
    next_task: int = 0
    skip_ids: int = 0

    @classmethod
    def read(cls, folder: Path) -> Progress:
        try:
            d = json.loads((folder / PROGRESS).read_text())
            return cls(d["shards"], d["next_task"], d["skip_ids"])
        except (OSError, ValueError, KeyError):  # none yet, or cut off by a crash: start over
            return cls()

    def save(self, folder: Path) -> None:
        atomic_write_json(folder / PROGRESS, {"shards": self.shards, "next_task": self.next_task,
                                              "skip_ids": self.skip_ids})

    def tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.shards[split])


def _append(f, ids: np.ndarray) -> None:
    """Write ids at the end of an open shard (the one place a shard's bytes are written)."""
    f.write(ids.tobytes())


class ShardWriter:
    """Writes the ids of one split, task by task, into shards of ``shard_tokens`` ids."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, progress: Progress):
        self.folder, self.split, self.shard_tokens, self.progress = folder, split, shard_tokens, progress
        self.part = folder / f"{split}.part"
        self.file = None
        self.in_shard = 0  # ids in the open shard

    def write(self, task: int, ids: np.ndarray, skip: int = 0) -> None:
        """Add ``ids[skip:]``, the ids of task number ``task``, sealing each shard that fills up."""
        at = skip
        while at < len(ids):
            if self.in_shard == self.shard_tokens:  # full, and more ids come: it is not the last
                self._seal(only=False, next_task=task, skip_ids=at)
            take = min(len(ids) - at, self.shard_tokens - self.in_shard)
            self._write(ids[at:at + take])
            at += take

    def finish(self, next_task: int) -> None:
        """The split has ended: seal its last shard; the next split starts at task ``next_task``."""
        if self.in_shard:
            self._seal(only=not self.progress.shards[self.split], next_task=next_task, skip_ids=0)

    def _write(self, ids: np.ndarray) -> None:
        try:
            if self.file is None:
                self.file = open(self.part, "wb")  # noqa: SIM115 (kept open across calls, closed by _seal)
            _append(self.file, ids)
        except OSError:
            self.discard()  # a full disk leaves no partial shard behind
            raise
        self.in_shard += len(ids)

    def _seal(self, only: bool, next_task: int, skip_ids: int) -> None:
        name = shard_name(self.split, len(self.progress.shards[self.split]), only)
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError:
            self.discard()
            raise
        self.file = None
        os.replace(self.part, self.folder / name)
        self.progress.shards[self.split].append({"path": name, "tokens": self.in_shard})
        self.progress.next_task, self.progress.skip_ids = next_task, skip_ids
        self.progress.save(self.folder)
        self.in_shard = 0

    def discard(self) -> None:
        """Remove the unfinished shard (on an error, or when the run stops)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        self.part.unlink(missing_ok=True)
        self.in_shard = 0
