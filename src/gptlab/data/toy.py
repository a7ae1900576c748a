"""Toy sequence-to-sequence tasks generated in code (reverse or sort a string of digits), and the
job that trains an encoder-decoder Transformer on one with the one training loop.

Small enough that an encoder-decoder Transformer learns them in a minute on a CPU, and exact:
an answer is right or wrong, so exact-match accuracy on held-out inputs says whether the model
learned the rule or memorised examples. The split between training and held-out inputs is a
fixed function of the input (a checksum), so no held-out input is ever trained on, whatever the
seed or the number of examples drawn.

Token ids: 0 padding, 1 begin-of-sequence, 2 end-of-sequence, 3..12 the digits 0..9.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.config import TrainConfig
from gptlab.errors import UserError
from gptlab.model.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, save_seq2seq
from gptlab.train.loop import Batch, Job, RunResult, run_job

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
class ToyTask:
    """A task name and the range of input lengths, in digits."""

    name: str = "reverse"
    min_len: int = 1
    max_len: int = 8

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise UserError(f"unknown toy task {self.name!r}; tasks: {', '.join(TASKS)}")
        if not 1 <= self.min_len <= self.max_len:
            raise UserError(f"toy task lengths must satisfy 1 <= min_len <= max_len, got "
                            f"min_len={self.min_len}, max_len={self.max_len}")

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


# --- training an encoder-decoder on a task ---------------------------------------------------


def seq2seq_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross entropy of the decoder's next-token predictions for a batch ``(src, tgt_in, tgt_out)``."""
    return model(*batch)[1]


def exact_match(model: Seq2SeqTransformer, task: ToyTask, sources: list[list[int]], batch_size: int = 500) -> float:
    """Fraction of ``sources`` whose greedy answer equals the task's answer exactly."""
    device = model.embed_tokens.weight.device
    right = 0
    for i in range(0, len(sources), batch_size):
        chunk = sources[i : i + batch_size]
        src = task.batch(chunk)[0].to(device)
        answers = model.greedy_decode(src, BOS, EOS, task.max_target_len).tolist()
        right += sum(decode(a) == decode(task.answer(s)) for a, s in zip(answers, chunk))
    return right / len(sources)


def seq2seq_job(model: Seq2SeqTransformer, task: ToyTask, cfg: TrainConfig, n_held_out: int = 500) -> Job:
    """The loop's job: random training inputs, a fixed set of ``n_held_out`` held-out inputs for
    the validation loss and ``val_accuracy``, and fixed training inputs for the train loss."""
    held_out = task.draw(n_held_out, "val", torch.Generator().manual_seed(cfg.seed + 1))
    seen = task.draw(cfg.batch_size * cfg.eval_batches, "train", torch.Generator().manual_seed(cfg.seed + 2))

    def eval_batches(split: str) -> Iterator[Batch]:
        sources = held_out if split == "val" else seen
        return (task.batch(sources[i : i + cfg.batch_size]) for i in range(0, len(sources), cfg.batch_size))

    def eval_metrics(m: nn.Module) -> dict[str, float]:
        # ``m`` may be the compiled or wrapped forward; greedy decoding needs the model's methods.
        return {"val_accuracy": exact_match(model, task, held_out)}

    def save(path: Path, train_state: dict[str, Any] | None, weights=None, folders=None) -> None:
        extra = {"task": asdict(task)} if train_state is None else {"task": asdict(task), "train": cfg.to_dict()}
        save_seq2seq(path, model, extra, train_state)

    c = model.config
    return Job(model, ToyBatches(task, cfg.batch_size, cfg.seed), eval_batches, save,
               description=f"training a {c.n_layer}+{c.n_layer}-layer encoder-decoder ({model.num_parameters():,} "
                           f"parameters) to {task.name} {task.min_len}-{task.max_len} digits",
               loss=seq2seq_loss, eval_metrics=eval_metrics)


def train_seq2seq(task: ToyTask, model_cfg: Seq2SeqConfig, cfg: TrainConfig, run_dir: str | Path,
                  show_progress: bool = True) -> tuple[Seq2SeqTransformer, RunResult]:
    """Train a fresh encoder-decoder on ``task`` into ``run_dir``; returns the model (as it is at
    the end, not best/) and the run's result, whose ``last_eval`` holds ``val_accuracy``."""
    if cfg.fsdp:
        raise UserError("--fsdp is for large decoder models; train the toy encoder-decoder without it")
    if model_cfg.vocab_size != VOCAB_SIZE:
        raise UserError(f"vocab_size={model_cfg.vocab_size} must be {VOCAB_SIZE} for the toy tasks (3 special "
                        "tokens and 10 digits)")
    if model_cfg.block_size < task.max_target_len:
        raise UserError(f"block_size={model_cfg.block_size} is shorter than the task's sequences "
                        f"({task.max_target_len} tokens); raise block_size or lower max_len")
    torch.manual_seed(cfg.seed)
    model = Seq2SeqTransformer(model_cfg)
    return model, run_job(seq2seq_job(model, task, cfg), cfg, run_dir, show_progress=show_progress)
