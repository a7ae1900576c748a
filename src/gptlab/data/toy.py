"""Toy sequence-to-sequence tasks generated in code (reverse or sort a string of digits); the job
that trains an encoder-decoder Transformer on one is ``gptlab.train.toy_seq2seq``.

Small enough that an encoder-decoder Transformer learns them in a minute on a CPU, and exact:
an answer is right or wrong, so exact-match accuracy on held-out inputs says whether the model
learned the rule or memorised examples. The split between training and held-out inputs is a
fixed function of the input (a checksum), so no held-out input is ever trained on, whatever the
seed or the number of examples drawn.

Token ids: 0 padding, 1 begin-of-sequence, 2 end-of-sequence, 3..12 the digits 0..9.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gptlab.errors import Problems, Settings, UserError, is_int

PAD, BOS, EOS = 0, 1, 2
FIRST_DIGIT = 3
VOCAB_SIZE = FIRST_DIGIT + 10
IGNORE = -100  # target id that the cross entropy skips (padding after the end of a target)

#: what each task does to the list of digits
TASKS: dict[str, Callable[[list[int]], list[int]]] = {
    "reverse": lambda digits: digits[::-1],
    "sort": sorted,
}
#: one input in HELD_OUT_EVERY (by checksum) is held out of training
HELD_OUT_EVERY = 10


def encode(digits: str) -> list[int]:
    """"3141" -> token ids [6, 4, 7, 4]."""
    if not digits.isdigit():
        raise UserError(f"toy tasks take strings of digits 0-9, got {digits!r}")
    return [FIRST_DIGIT + int(c) for c in digits]


def decode(ids: list[int]) -> str:
    """Token ids -> digits, stopping at the first end-of-sequence and skipping other specials."""
    out = []
    for i in ids:
        if i == EOS:
            break
        if i >= FIRST_DIGIT:
            out.append(str(i - FIRST_DIGIT))
    return "".join(out)


@dataclass(frozen=True)
class ToyTask(Settings):
    """A task name and the range of input lengths, in digits."""

    name: str = "reverse"
    min_len: int = 1
    max_len: int = 8

    WHAT = "toy task"

    def __post_init__(self) -> None:  # frozen, so checked once, when made
        self.validate()

    def _check(self, p: Problems) -> None:
        p.choice("name", TASKS)
        p.whole("min_len")
        p.add(not (is_int(self.min_len) and is_int(self.max_len)) or self.min_len <= self.max_len,
              f"{p.said('min_len')} cannot exceed {p.said('max_len')}")

    @property
    def max_target_len(self) -> int:
        """Longest decoder sequence: the answer (as long as the input) plus EOS or BOS."""
        return self.max_len + 1

    def answer(self, src: list[int]) -> list[int]:
        """The target token ids for input token ids ``src``."""
        return TASKS[self.name](src)

    def draw(self, n: int, split: str, generator: torch.Generator) -> list[list[int]]:
        """``n`` random inputs (token ids) of ``split`` "train" or "val", drawn with ``generator``."""
        want_held_out = split == "val"
        out: list[list[int]] = []
        while len(out) < n:
            length = int(torch.randint(self.min_len, self.max_len + 1, (), generator=generator))
            src = (torch.randint(0, 10, (length,), generator=generator) + FIRST_DIGIT).tolist()
            if is_held_out(src) == want_held_out:
                out.append(src)
        return out

    def batch(self, sources: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(src, tgt_in, tgt_out)`` for a list of inputs, each (B, length), right-padded.

        The decoder reads ``tgt_in`` = BOS + answer (padded with PAD) and learns to predict
        ``tgt_out`` = answer + EOS (padded with IGNORE): position t predicts token t + 1, the
        same shift as language modelling ("teacher forcing").
        """
        src = torch.full((len(sources), self.max_len), PAD)
        tgt_in = torch.full((len(sources), self.max_target_len), PAD)
        tgt_out = torch.full((len(sources), self.max_target_len), IGNORE)
        for i, s in enumerate(sources):
            answer = self.answer(s)
            src[i, : len(s)] = torch.tensor(s)
            tgt_in[i, : len(answer) + 1] = torch.tensor([BOS, *answer])
            tgt_out[i, : len(answer) + 1] = torch.tensor([*answer, EOS])
        return src, tgt_in, tgt_out


def is_held_out(src: list[int]) -> bool:
    """Whether input ``src`` belongs to the held-out part: a fixed function of the digits."""
    return zlib.crc32(bytes(src)) % HELD_OUT_EVERY == 0


class ToyBatches:
    """Endless random training batches of a ``ToyTask``; the generator's state is the position,
    so a resumed run draws exactly the batches it would have drawn."""

    def __init__(self, task: ToyTask, batch_size: int, seed: int) -> None:
        self.task, self.batch_size = task, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.task.batch(self.task.draw(self.batch_size, "train", self.generator))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
