"""Load any MODEL argument: a gptlab checkpoint or run directory, a LoRA adapter (or a run that
trained one), a Hugging Face model directory, ``hf:ORG/NAME``, a ``.gguf`` file or a named
model such as ``smollm2-135m-instruct``. Every command that takes a MODEL comes through here."""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab.cache import recover_dir
from gptlab.model.lora import merge_lora
from gptlab.tokenizers import load_tokenizer_file
from gptlab.weights import build_checked
from gptlab.weights.adapter import ADAPTER_CONFIG, apply_adapter, load_adapter
from gptlab.weights.checkpoint import (
    TOKENIZER,
    WEIGHTS,
    Checkpoint,
    _read_weights,
    load_model_config,
    resolve_checkpoint,
)
from gptlab.weights.gguf import import_gguf
from gptlab.weights.hf import download_hf, import_hf, is_hf_dir
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
    tokenizer = load_tokenizer_file(ckpt_dir / TOKENIZER)
    return Checkpoint(ckpt_dir, model.to(device), config, tokenizer)


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
