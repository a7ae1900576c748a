"""Checkpoints: one directory per checkpoint, written atomically, loaded without unpickling.

A checkpoint directory holds
- ``model.safetensors``: the weights (a tied output head is stored once, as ``embed_tokens``);
- ``config.json``: the ``ModelConfig``;
- ``tokenizer.json``: the tokenizer, so a checkpoint is self-contained (absent only where the
  weights were imported without one: ``MissingTokenizer`` then stands in and says how to add it);
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
from gptlab.tokenizers import Tokenizer, load_tokenizer_file, tokenizer_file_in
from gptlab.weights import check_state_dict

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TRAIN_CONFIG = "train_config.json"
TRAIN_STATE = "train_state.pt"
CHAT_CONFIG = "tokenizer_config.json"  # named as in Hugging Face directories: chat template, special tokens
GENERATION_CONFIG = "generation_config.json"  # Hugging Face's generation defaults: the ids that end a turn


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer


class MissingTokenizer(Tokenizer):
    """The tokenizer of weights imported without one (a Hugging Face directory with no
    tokenizer.json): the model still runs on ids, exports and evaluates on ids, but anything that
    turns text into ids or back fails with one line that says how to give it a tokenizer.
    It is never saved: such a checkpoint directory simply has no tokenizer.json."""

    kind = "missing"

    def __init__(self, source: str | Path, vocab_size: int):
        self.source = str(source)
        self._vocab_size = vocab_size
        self.special_tokens = {}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def error(self) -> UserError:
        return UserError(f"{self.source} has no tokenizer, so it cannot read or write text; give it one with "
                         f"gptlab import {self.source} --tokenizer TOKENIZER --out DIR (TOKENIZER: a tokenizer.json, "
                         "gpt2, or a model or checkpoint whose tokenizer it uses)")

    def encode(self, text: str, allowed_special=()) -> list[int]:
        raise self.error()

    def decode_bytes(self, ids) -> bytes:
        raise self.error()

    def to_dict(self) -> dict[str, Any]:
        raise self.error()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MissingTokenizer:
        raise UserError("a missing tokenizer has no saved form")


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, source: str | Path) -> Tokenizer:
    """``tokenizer``, once checked to produce only ids a model of ``vocab_size`` ids has."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{source} has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
                        "they do not belong together")
    return tokenizer


def load_tokenizer(ckpt_dir: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer of a checkpoint directory (its tokenizer.json) or of a Hugging Face one (its
    tokenizer.json, else its SentencePiece tokenizer.model); a ``MissingTokenizer`` where the
    weights came without one."""
    found = tokenizer_file_in(ckpt_dir)
    return MissingTokenizer(ckpt_dir, vocab_size) if found is None else load_tokenizer_file(found)


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
        if not isinstance(tokenizer, MissingTokenizer):
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


def export_chat_files(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """The ``tokenizer_config.json`` and ``generation_config.json`` an export carries, so that other
    tools talk to the model as gptlab does: its chat template (its own, or the built-in one gptlab
    chats with, and fine-tunes on, a model that has none), its special tokens, and as
    ``eos_token_id`` every id on which gptlab ends a turn (``turn_end_tokens``)."""
    from gptlab.tokenizers.chat_template import chat_format, checkpoint_chat_config, turn_end_tokens

    template, _ = chat_format(ckpt)
    specials = ckpt.tokenizer.special_tokens
    ends = turn_end_tokens(ckpt)
    eos = ends[0] if ends else next(iter(specials), None)
    files: dict[str, dict[str, Any]] = {CHAT_CONFIG: {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": ckpt.config.block_size,
        **({"eos_token": eos, "bos_token": eos} if eos else {}), **checkpoint_chat_config(ckpt),
        "chat_template": template}}
    stored = Path(ckpt.path) / GENERATION_CONFIG
    generation = _read_json(stored) if stored.is_file() else {}
    if not isinstance(generation, dict):
        raise UserError(f"{stored} does not hold a JSON object; the checkpoint is corrupt")
    listed = generation.get("eos_token_id")
    stored_ids = listed if isinstance(listed, list) else [] if listed is None else [listed]
    ids = list(dict.fromkeys([*stored_ids, *(specials[n] for n in ends)]))
    if ids:
        files[GENERATION_CONFIG] = {**generation, "eos_token_id": ids}
    return files


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
