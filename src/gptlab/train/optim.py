"""The optimizer and the learning-rate schedule.

AdamW with decoupled weight decay on weight matrices only: decaying biases and norm gains
towards zero only fights the normalisation, and decaying embeddings shrinks rare tokens'
vectors. The schedule is linear warmup (Adam's second-moment estimates are noisy in the first
steps, so big steps then are risky) followed by cosine decay to a floor.
"""

from __future__ import annotations

import math

import torch

from gptlab.config import TrainConfig
from gptlab.model.transformer import GPT


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = model.configure_optimizer_groups(cfg.weight_decay, decay_embeddings=cfg.decay_embeddings)
    # fused runs the whole update as one kernel on CUDA; foreach batches it on the CPU.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=not fused)
