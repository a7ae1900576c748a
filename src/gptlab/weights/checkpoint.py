"""Checkpoints: one directory per checkpoint, written atomically, loaded without unpickling.

A checkpoint directory holds
- ``model.safetensors``: the weights (a tied output head is stored once, as ``embed_tokens``);
- ``config.json``: the ``ModelConfig``;
- ``tokenizer.json``: the tokenizer, so a checkpoint is self-contained;
- ``train_config.json`` and ``train_state.pt`` (optimizer, step, RNG states, data position)
  when it can resume training. ``train_state.pt`` holds only tensors and plain Python values and
  is read with ``torch.load(weights_only=True)``, which refuses pickled code.

A training run directory keeps ``last/`` (for ``--resume``) and ``best/`` (lowest validation
loss); ``resolve_checkpoint`` accepts a run directory or a checkpoint directory. Loading any
MODEL argument (named models, Hugging Face and GGUF files, adapters too) is ``gptlab.weights.load``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.cache import atomic_dir, recover_dir, write_json
from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.tokenizers import Tokenizer
from gptlab.weights import check_state_dict

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAIN_CONFIG = "train_config.json"
TRAIN_STATE = "train_state.pt"
CHAT_CONFIG = "tokenizer_config.json"  # named as in Hugging Face directories: chat template, special tokens


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer


def save_checkpoint(path: str | Path, model: GPT, tokenizer: Tokenizer, train_config: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None, extra_json: dict[str, Any] | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None, folders: dict[str, Path] | None = None) -> None:
    """Write a checkpoint directory; it replaces ``path`` only once completely written.

    ``extra_json`` maps more file names to JSON values written with the rest, such as a chat
    model's template and special tokens (``{CHAT_CONFIG: {...}}``) or a classifier's classes;
    a ``bytes`` value is written as it is (a side file copied from an imported model).
    ``state_dict`` stands in for the model's own (FSDP gathers the weights of a sharded model);
    ``folders`` ({name: existing folder}) are moved into the checkpoint before it is put in place."""
    state = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as embed_tokens.weight
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        write_json(tmp / MODEL_CONFIG, model.config.to_dict())
        tokenizer.save(tmp / TOKENIZER)
        if train_config is not None:
            write_json(tmp / TRAIN_CONFIG, train_config)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        for name, value in (extra_json or {}).items():
            if isinstance(value, bytes):
                (tmp / name).write_bytes(value)
            else:
                write_json(tmp / name, value)
        for name, folder in (folders or {}).items():
            Path(folder).rename(tmp / name)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """The checkpoint directory for ``path``: itself, or its ``best/`` or ``last/`` subfolder."""
    path = Path(path)
    order = [path, path / prefer, path / ("last" if prefer == "best" else "best")]
    for candidate in order:
        recover_dir(candidate)
        if (candidate / WEIGHTS).is_file():
            return candidate
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; give a run directory made by gptlab train "
                        "or a checkpoint directory")
    raise UserError(f"{path} holds no checkpoint ({WEIGHTS} not found in it, {prefer}/ or last/)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); use another checkpoint") from None


def load_model_config(ckpt_dir: Path) -> ModelConfig:
    d = _read_json(ckpt_dir / MODEL_CONFIG)
    if not isinstance(d, dict):
        raise UserError(f"{ckpt_dir / MODEL_CONFIG} holds {type(d).__name__}, not a JSON object of model settings; "
                        "the checkpoint is corrupt")
    return ModelConfig.from_dict(d)


def _read_weights(ckpt_dir: Path, tied: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` (the tied head filled in); at most the file's size."""
    try:
        state = load_file(str(ckpt_dir / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{ckpt_dir / WEIGHTS} cannot be read ({e}); the checkpoint is corrupt") from None
    if tied and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def load_weights(model: GPT, ckpt_dir: Path) -> None:
    """Copy weights from ``ckpt_dir`` into ``model``, checking every name and shape first."""
    state = _read_weights(ckpt_dir, model.config.tie_embeddings)
    check_state_dict(state, model.state_dict(), f"{ckpt_dir / WEIGHTS} (with its config.json)")
    model.load_state_dict(state)


def load_train_state(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved train config and train state; refuses anything that is not plain data."""
    f = ckpt_dir / TRAIN_STATE
    if not f.is_file():
        hint = ("; the run stopped before it wrote last/, so start it again (same --out, with --force)"
                if ckpt_dir.name == "best" else "")
        raise UserError(f"{ckpt_dir} has no {TRAIN_STATE}, so training cannot resume from it{hint}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise UserError(f"{f} cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "the file is corrupt or not a gptlab train state") from None
    return _read_json(ckpt_dir / TRAIN_CONFIG), state
