"""Load any MODEL argument: a gptlab checkpoint or run directory, a LoRA adapter (or a run that
trained one), a Hugging Face model directory, ``hf:ORG/NAME``, a ``.gguf`` file or a named
model such as ``smollm2-135m-instruct``. Every command that takes a MODEL comes through here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gptlab.cache import recover_dir
from gptlab.errors import UserError
from gptlab.model.lora import merge_lora
from gptlab.tokenizers import Tokenizer, build_tokenizer
from gptlab.weights import build_checked
from gptlab.weights.adapter import ADAPTER_CONFIG, apply_adapter, load_adapter
from gptlab.weights.checkpoint import (
    WEIGHTS,
    Checkpoint,
    MissingTokenizer,
    _read_weights,
    check_tokenizer_fits,
    load_model_config,
    load_tokenizer,
    resolve_checkpoint,
)
from gptlab.weights.gguf import import_gguf, read_gguf, tokenizer_from_metadata
from gptlab.weights.hf import DTYPES, download_hf, import_hf, is_hf_dir
from gptlab.weights.named import NAMED_MODELS, resolve_named


def resolve_model_source(path: str | Path) -> Path:
    """Turn a named model or ``hf:ORG/NAME`` into a local path; other paths pass through.

    A named model is used only when no file or folder of that name exists, so a user's path wins.
    """
    if str(path).startswith("hf:"):
        return download_hf(str(path))
    if str(path) in NAMED_MODELS and not Path(path).exists():
        return resolve_named(str(path))
    return Path(path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", prefer: str = "best") -> Checkpoint:
    """Load model, config and tokenizer from any MODEL argument: a gptlab checkpoint or run
    directory, a LoRA adapter (or a run that trained one), a Hugging Face model directory,
    ``hf:ORG/NAME``, a ``.gguf`` file or a named model such as ``smollm2-135m-instruct`` (all
    but the first two imported on the fly)."""
    path = resolve_model_source(path)
    adapter = find_adapter(path, prefer)
    if adapter is not None:
        return load_adapted(adapter, device)
    # Foreign formats are imported in memory; our config.json has no model_type, HF's always does.
    importer = import_gguf if path.suffix == ".gguf" else import_hf if is_hf_dir(path) else None
    if importer is not None:
        loaded = importer(path)
        loaded.model.to(device)
        return loaded
    ckpt_dir = resolve_checkpoint(path, prefer)
    config = load_model_config(ckpt_dir)
    state = _read_weights(ckpt_dir, config.tie_embeddings)
    # Checked before it is built: a config.json that declares a huge model allocates nothing.
    model = build_checked(config, state, f"{ckpt_dir / WEIGHTS} (with its config.json)")
    model.load_state_dict(state)
    return Checkpoint(ckpt_dir, model.to(device), config, load_tokenizer(ckpt_dir, config.vocab_size))


def with_tokenizer(ckpt: Checkpoint, tokenizer: Tokenizer, dtype: str = "fp32") -> Checkpoint:
    """``ckpt`` with ``tokenizer`` (checked to fit its model) in place of its own, weights cast to ``dtype``."""
    check_tokenizer_fits(tokenizer, ckpt.config.vocab_size, "the tokenizer given")
    return dataclasses.replace(ckpt, model=ckpt.model.to(DTYPES[dtype]), tokenizer=tokenizer)


def load_tokenizer_spec(spec: str) -> Tokenizer:
    """The tokenizer ``--tokenizer SPEC`` of ``gptlab import`` names: ``gpt2`` (or ``gpt2:FOLDER``), a
    tokenizer .json file (Hugging Face's or gptlab's), or any MODEL (a checkpoint or run directory, a
    Hugging Face directory, a .gguf file, a named model), whose tokenizer is read without its weights."""
    if spec == "gpt2" or spec.startswith("gpt2:") or (Path(spec).is_file() and Path(spec).suffix == ".json"):
        return build_tokenizer(spec)
    path = resolve_model_source(spec)
    if path.suffix == ".gguf":
        tokenizer: Tokenizer = tokenizer_from_metadata(read_gguf(path)[1], path)[0]
    elif path.is_dir():
        tokenizer = load_tokenizer(path if is_hf_dir(path) else resolve_checkpoint(path), 0)
    else:
        what = "is neither gpt2, a tokenizer .json file nor a model" if path.exists() else "does not exist"
        raise UserError(f"--tokenizer {spec!r} {what}; give a tokenizer .json file, gpt2 or a model that has one")
    if isinstance(tokenizer, MissingTokenizer):
        raise UserError(f"--tokenizer {spec!r}: {path} has no tokenizer either; name a tokenizer.json, gpt2 or a model "
                        "that has one")
    return tokenizer


def find_adapter(path: Path, prefer: str = "best") -> Path | None:
    """The LoRA adapter directory ``path`` names (itself, or its best/ or last/), if any."""
    for candidate in (path, path / prefer, path / ("last" if prefer == "best" else "best")):
        recover_dir(candidate)
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def load_adapted(adapter_dir: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """The adapter's base model (named in its adapter_config.json) with the adapter merged in:
    an ordinary model at full speed. The result keeps the base's path, so its chat template
    and tokenizer files are found."""
    adapter = load_adapter(adapter_dir)
    base = load_checkpoint(adapter.base_model, device)
    apply_adapter(base.model, adapter)
    merge_lora(base.model)
    return base
