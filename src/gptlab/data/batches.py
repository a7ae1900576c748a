"""Batches of (input, target) windows cut from a flat array of token ids.

A language model learns to predict token t+1 from tokens 0..t, so a training example is a
window of ``block_size + 1`` consecutive ids: the first ``block_size`` are the input ``x`` and
the same window shifted by one is the target ``y``. Every position in the window is a
prediction, so one window teaches ``block_size`` next-token predictions at once.

- ``RandomBatches`` draws windows at random offsets (pretraining: an endless stream whose
  position is the state of its random generator, saved with the checkpoint for exact resume).
- ``sliding_windows`` walks the array in order with a stride (evaluation over a whole split).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gptlab.errors import UserError


def check_length(tokens: np.ndarray, block_size: int, split: str) -> None:
    if len(tokens) < block_size + 1:
        raise UserError(f"the {split} split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                        "use a smaller --block-size or more text (or a smaller --val-fraction for a short corpus)")


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, T+1) gather in one numpy fancy-index, then one conversion to int64 for the embedding.
    rows = tokens[starts[:, None] + np.arange(block_size + 1)]
    batch = torch.from_numpy(rows.astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


class RandomBatches:
    """Endless batches of windows at uniformly random offsets, reproducible from a seed."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, split: str = "train"):
        check_length(tokens, block_size, split)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: inputs and targets, each (batch_size, block_size) int64 on the CPU."""
        high = len(self.tokens) - self.block_size  # last valid start leaves room for the shifted target
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        return _windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def sliding_windows(tokens: np.ndarray, block_size: int, batch_size: int, stride: int | None = None,
                    split: str = "val") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of windows starting at 0, stride, 2*stride, ... (stride defaults to block_size)."""
    check_length(tokens, block_size, split)
    stride = stride or block_size
    starts = np.arange(0, len(tokens) - block_size, stride)
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i:i + batch_size], block_size)
