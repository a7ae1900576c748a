"""Encoding tasks in worker processes, results in task order, with little in flight.

Each worker loads the tokenizer once from its saved file and then turns tasks (pieces of text,
see ``gptlab.data.pieces``) into arrays of ids. The main process hands out at most
``IN_FLIGHT_PER_WORKER`` tasks per worker ahead of the one it waits for, and takes the results
back strictly in task order: memory stays a few tasks' worth whatever the corpus size, and the
ids are the same for any number of workers. With one worker the tasks are encoded right in the
calling process (nothing to gain from a second process, and no start-up cost).

Workers ignore Ctrl-C: the main process receives it, stops handing out work and ends them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gptlab.data.pieces import Task
from gptlab.errors import UserError
from gptlab.tokenizers import Tokenizer, load_tokenizer_file

IN_FLIGHT_PER_WORKER = 2
#: what joins two documents when the tokenizer has no end-of-text token (as before there was one)
TEXT_SEPARATOR = "\n\n"

_encoder: dict = {}  # in each worker: the tokenizer, the dtype and the separator's ids


def available_cores() -> int:
    """The cores this process may run on (fewer than the machine's under taskset or a cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def separator_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids put between two documents: the end-of-text token, or a blank line without one.
    (None at all for a character vocabulary that has no newline: it was built from a corpus of
    one document, which needs no separator.)"""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode(TEXT_SEPARATOR)
    except UserError:
        return []


def _start(tokenizer_file: str, dtype: str) -> None:
    """Set up a worker (or the calling process): load the tokenizer, ignore Ctrl-C in workers."""
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tokenizer = load_tokenizer_file(tokenizer_file)
    _encoder.update(tokenizer=tokenizer, dtype=np.dtype(dtype), separator=separator_ids(tokenizer))


def encode_pieces(pieces: list[tuple[bool, str]]) -> np.ndarray:
    """The ids of a task's pieces, the separator before each piece that starts a document.
    Special-token strings in the text are encoded as plain text, never as special tokens."""
    tokenizer, dtype = _encoder["tokenizer"], _encoder["dtype"]
    separator = np.asarray(_encoder["separator"], dtype=dtype)
    parts = []
    for starts_document, text in pieces:
        if starts_document:
            parts.append(separator)
        parts.append(np.asarray(tokenizer.encode(text), dtype=dtype))  # a list of ints only one piece long
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def encode_in_order(tasks: Iterable[Task], tokenizer_file: Path, dtype: np.dtype,
                    workers: int) -> Iterator[tuple[Task, np.ndarray]]:
    """``(task, ids)`` for every task, in order, encoded by ``workers`` processes."""
    if workers == 1:
        _start(str(tokenizer_file), dtype.name)
        yield from ((task, encode_pieces(task.pieces)) for task in tasks)
        return
    # spawn, not fork: the caller may hold threads (torch's, tqdm's) that a fork would copy half-way
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start, initargs=(str(tokenizer_file), dtype.name)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(encode_pieces, (task.pieces,))))
            if len(pending) > IN_FLIGHT_PER_WORKER * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()
