"""Batches of (input, target) windows cut from token ids: one flat array, or the shards of a split.

A language model learns to predict token t+1 from tokens 0..t, so a training example is a
window of ``block_size + 1`` consecutive ids: the first ``block_size`` are the input ``x`` and
the same window shifted by one is the target ``y``. Every position in the window is a
prediction, so one window teaches ``block_size`` next-token predictions at once.

- ``RandomBatches`` draws windows at random offsets (pretraining: an endless stream whose
  position is the state of its random generator, saved with the checkpoint for exact resume).
  Over several shards (memmaps of a prepared split) every window start is equally likely, so a
  shard is drawn from in proportion to its size; a window stays inside one shard. Under DDP or
  FSDP every process draws the same global batch from the same seed and keeps its own rows
  (``gptlab.train.distributed.shard_batch``): the processes' parts are disjoint and
  deterministic, and one saved generator state resumes them all.
- ``sliding_windows`` walks the array in order with a stride (evaluation over a whole split).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gptlab.errors import UserError

Shards = Sequence[np.ndarray]


def _as_shards(tokens: np.ndarray | Shards) -> list[np.ndarray]:
    return [tokens] if isinstance(tokens, np.ndarray) else list(tokens)


def check_length(tokens: np.ndarray | Shards, block_size: int, split: str) -> None:
    """Refuse a split (an array, or shards) with no room for one window of ``block_size + 1`` ids."""
    shards = _as_shards(tokens)
    if not any(len(s) >= block_size + 1 for s in shards):
        n = sum(len(s) for s in shards)
        where = f" (in {len(shards)} shards, none that long)" if len(shards) > 1 else ""
        raise UserError(f"the {split} split has {n} tokens{where}, fewer than block_size + 1 = {block_size + 1}; "
                        "use a smaller --block-size or more text (or a smaller --val-fraction for a short corpus)")


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
    # (B, T+1) gather in one numpy fancy-index
    return tokens[starts[:, None] + np.arange(block_size + 1)]


def _as_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(rows.astype(np.int64))  # one conversion to int64, for the embedding
    return batch[:, :-1], batch[:, 1:]


class RandomBatches:
    """Endless batches of windows at uniformly random offsets, reproducible from a seed.

    ``tokens`` is one array or a list of shards; the draw is the same either way for one array,
    so datasets prepared before shards train exactly as they did."""

    def __init__(self, tokens: np.ndarray | Shards, block_size: int, batch_size: int, seed: int,
                 split: str = "train"):
        check_length(tokens, block_size, split)
        self.shards, self.block_size, self.batch_size = _as_shards(tokens), block_size, batch_size
        # Window starts per shard (the last valid start leaves room for the shifted target), and
        # where each shard's starts begin in the numbering of all of them.
        self.starts = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.starts)[:-1]])
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: inputs and targets, each (batch_size, block_size) int64 on the CPU."""
        picks = torch.randint(int(self.starts.sum()), (self.batch_size,), generator=self.generator).numpy()
        if len(self.shards) == 1:
            return _as_batch(_windows(self.shards[0], picks, self.block_size))
        shard = np.searchsorted(self.first, picks, side="right") - 1  # the shard each start falls in
        rows = np.empty((self.batch_size, self.block_size + 1), dtype=self.shards[0].dtype)
        for i in np.unique(shard):
            mine = shard == i
            rows[mine] = _windows(self.shards[i], picks[mine] - self.first[i], self.block_size)
        return _as_batch(rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The position in the stream, and the sizes of the shards it is a position in."""
        return {"generator": self.generator.get_state(), "shard_tokens": torch.tensor([len(s) for s in self.shards])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        sizes = state.get("shard_tokens")  # absent in checkpoints from before shards
        if sizes is not None and sizes.tolist() != [len(s) for s in self.shards]:
            raise UserError(f"the checkpoint was trained on shards of {sizes.tolist()} tokens, the data given has "
                            f"{[len(s) for s in self.shards]}; resume with the data it was trained on")
        self.generator.set_state(state["generator"])


def sliding_windows(tokens: np.ndarray, block_size: int, batch_size: int, stride: int | None = None,
                    split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of windows starting at 0, stride, 2*stride, ... (stride defaults to block_size)."""
    check_length(tokens, block_size, split)
    stride = stride or block_size
    starts = np.arange(0, len(tokens) - block_size, stride)
    for i in range(0, len(starts), batch_size):
        yield _as_batch(_windows(tokens, starts[i:i + batch_size], block_size))
