"""Training an encoder-decoder Transformer on a toy task (``gptlab.data.toy``) with the one
training loop, and scoring it by exact match on held-out inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.config import TrainConfig
from gptlab.data.toy import BOS, EOS, VOCAB_SIZE, ToyBatches, ToyTask, decode
from gptlab.errors import UserError
from gptlab.model.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, save_seq2seq
from gptlab.train.loop import Batch, Job, RunResult, run_job


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
