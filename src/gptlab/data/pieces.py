"""From a stream of documents to numbered encode tasks: the split, the document breaks, the pieces.

``gptlab prepare`` encodes a corpus in worker processes, a task at a time. Here the documents
become those tasks, in three steps, all streamed:

1. **The split.** Validation is the last ``val_fraction`` of the documents (at least one, and at
   least one stays for training). A corpus of one document (one text file) is cut inside its
   text instead: the last ``val_fraction`` of its characters, at the line break just after that
   point if one comes within 1% of the text (``split_point``).
2. **Pieces.** A long document is cut into pieces of about ``PIECE_CHARS`` characters, each cut
   just after a newline that sits between two non-space characters. The pre-tokenisation
   patterns of GPT-2 and GPT-4 never join text across such a newline into one chunk, so the ids
   of the pieces, one after another, are exactly the ids of the whole document.
3. **Tasks.** Consecutive pieces of one split make a task of about ``TASK_CHARS`` characters.
   A piece that starts a document (all but the first of its split) is marked, and the encoder
   puts the document separator (the end-of-text token) before it.

The tasks depend on the text alone: not on the number of workers, not on the machine. So the
ids come out the same however many processes encode them, and a preparation restarted after a
crash can skip the tasks it had finished by their number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby

from gptlab.errors import UserError

#: a document longer than this many characters is encoded in pieces
PIECE_CHARS = 1 << 20
#: a task holds about this many characters: enough to keep a worker busy for a while, small
#: enough that the tasks in flight take little memory
TASK_CHARS = 1 << 20
#: where a document may be cut without changing its ids (see step 2 above)
SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
#: (split, number of the document within its split, a block of its text)
Tagged = tuple[str, int, str]


def split_point(text: str, val_fraction: float) -> int:
    """Character index where validation starts: the line break nearest the exact fraction."""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.find("\n", cut)
    # Keep the cut within 1% of the requested place; otherwise cut mid-line.
    return nl + 1 if nl != -1 and nl + 1 - cut <= max(1, len(text) // 100) else cut


def val_documents(n_documents: int, val_fraction: float) -> int:
    """How many documents, at the end, form the validation split."""
    return min(n_documents - 1, max(1, round(n_documents * val_fraction)))


def split_blocks(documents: Iterator[Iterable[str]], n_documents: int, n_chars: int,
                 val_fraction: float) -> Iterator[Tagged]:
    """The documents' text blocks, each tagged with its split and its document's number there.

    ``n_documents`` (and for a single document ``n_chars``) come from a first read of the corpus;
    a corpus that changes between the two reads is refused."""
    if n_documents == 1:
        for part, block in _cut_text(next(documents), n_chars, val_fraction):
            yield ("train", "val")[part], 0, block
        n_seen = 1 + sum(1 for _ in documents)
    else:
        n_train = n_documents - val_documents(n_documents, val_fraction)
        n_seen = 0
        for i, doc in enumerate(documents):
            split, number = ("train", i) if i < n_train else ("val", i - n_train)
            for block in doc:
                yield split, number, block
            n_seen = i + 1
    if n_seen != n_documents:
        raise UserError(f"the corpus changed while it was being prepared ({n_documents:,} documents at first, "
                        f"{n_seen:,} now); run gptlab prepare again once it stays still")


def _cut_text(blocks: Iterable[str], n_chars: int, val_fraction: float) -> Iterator[tuple[int, str]]:
    """``split_point`` on a text that comes in blocks: (0, block) before the cut, (1, block) after."""
    cut, window = int(n_chars * (1.0 - val_fraction)), max(1, n_chars // 100)
    blocks, seen = iter(blocks), 0
    for block in blocks:
        if seen + len(block) <= cut:
            seen += len(block)
            yield 0, block
            continue
        head, ahead = block[:cut - seen], block[cut - seen:]
        while len(ahead) < window and "\n" not in ahead:  # look for a line break within the window
            more = next(blocks, None)
            if more is None:
                break
            ahead += more
        at = ahead.find("\n", 0, window) + 1  # 0 when there is none: cut at the exact place
        yield 0, head + ahead[:at]
        yield 1, ahead[at:]
        yield from ((1, b) for b in blocks)
        return


def pieces(blocks: Iterable[str], size: int = PIECE_CHARS) -> Iterator[str]:
    """One document's text, from blocks of any size, as pieces cut at safe newlines (step 2)."""
    text = ""
    for block in blocks:
        text += block
        start = 0
        while len(text) - start > size and (m := SAFE_CUT.search(text, start + size)):
            yield text[start:m.end()]
            start = m.end()
        text = text[start:]
    if text:
        yield text


@dataclass
class Task:
    """Numbered work for an encoder: pieces of one split, in order."""

    index: int
    split: str
    #: (a new document starts with this piece, its text)
    pieces: list[tuple[bool, str]] = field(default_factory=list)
    chars: int = 0
    bytes: int = 0  # of UTF-8 text

    def add(self, starts_document: bool, text: str) -> None:
        self.pieces.append((starts_document, text))
        self.chars += len(text)
        self.bytes += len(text.encode("utf-8"))


def encode_tasks(tagged: Iterable[Tagged], val_fraction: float) -> Iterator[Task]:
    """Tasks of about ``TASK_CHARS`` characters (step 3), numbered from 0; every training task
    comes before every validation task. A split of fewer than 2 characters is refused."""
    task_chars, piece_chars = TASK_CHARS, PIECE_CHARS  # read now, so a test can make them small
    task: Task | None = None
    index, chars = 0, {"train": 0, "val": 0}
    for (split, number), group in groupby((t for t in tagged if t[2]), key=lambda t: t[:2]):
        for k, piece in enumerate(pieces((block for _, _, block in group), piece_chars)):
            if task is not None and (task.split != split or task.chars >= task_chars):
                yield task
                task, index = None, index + 1
            task = task or Task(index, split)
            task.add(k == 0 and number > 0, piece)
            chars[split] += len(piece)
    if task is not None:
        yield task
    _check_split_sizes(chars, val_fraction)


def _check_split_sizes(chars: dict[str, int], val_fraction: float) -> None:
    if min(chars.values()) < 2:
        raise UserError(f"the corpus has {sum(chars.values())} characters, too short to split into training and "
                        f"validation (--val-fraction {val_fraction}); give more text")
