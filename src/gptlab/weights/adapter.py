"""LoRA adapter files: a directory holding ``adapter_model.safetensors`` (only the A and B
tensors, a few MB) and ``adapter_config.json`` (the ``LoRAConfig``, the base model it was
trained on and a fingerprint of that base's weights, checked before applying). The layers
themselves are ``gptlab.model.lora``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab.cache import atomic_dir, recover_dir, write_json
from gptlab.errors import UserError
from gptlab.model.lora import LoRAConfig, _is_lora, add_lora, lora_state_dict
from gptlab.model.transformer import GPT
from gptlab.weights import check_state_dict
from gptlab.weights.checkpoint import TRAIN_CONFIG, TRAIN_STATE

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Values sampled from each base tensor for the fingerprint: enough to tell two trainings
# apart, few enough to hash a 135M model in milliseconds.
FINGERPRINT_SAMPLES = 4096
# The config fields that decide the base's parameter shapes; they are compared one by one so
# that a mismatch can be named.
FINGERPRINT_FIELDS = ("arch", "vocab_size", "n_layer", "n_embd", "n_head", "kv_heads", "mlp_hidden")


def base_fingerprint(model: GPT) -> dict[str, Any]:
    """What identifies the base weights an adapter belongs to: the shape fields of the config
    and a sha256 over every base tensor's name, shape and an evenly strided sample of its values.

    Values are hashed as bfloat16 so that the same base loaded in float32 or bfloat16 (or on
    another device) gives the same fingerprint; any training of the base changes it.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if _is_lora(name):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)][:FINGERPRINT_SAMPLES]
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(sample.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    fields = {f: getattr(model.config, f) for f in FINGERPRINT_FIELDS}
    return {**fields, "weights_sha256": h.hexdigest()}


def save_adapter(path: str | Path, model: GPT, cfg: LoRAConfig, base_model: str,
                 train_state: dict[str, Any] | None = None, train_config: dict[str, Any] | None = None) -> None:
    """Write an adapter directory (atomically: it replaces ``path`` only once complete).

    ``base_model`` is the MODEL argument the base came from (``smollm2-135m-instruct``, a
    checkpoint path); it is recorded to tell the user which base the adapter needs. A training
    run also passes its ``train_state`` and ``train_config``, saved as in a checkpoint.
    """
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save; call add_lora first")
    meta = {**cfg.to_dict(), "base_model": base_model, "base_fingerprint": base_fingerprint(model)}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS))
        write_json(tmp / ADAPTER_CONFIG, meta)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        if train_config is not None:
            write_json(tmp / TRAIN_CONFIG, train_config)


@dataclass
class Adapter:
    path: Path
    config: LoRAConfig
    base_model: str
    base_fingerprint: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter directory made by ``save_adapter``; any damage is a one-line UserError.

    Tensors come from safetensors only (nothing is unpickled).
    """
    path = Path(path)
    recover_dir(path)  # a save interrupted mid-swap leaves the previous adapter as .NAME.old
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not path.is_dir():
        raise UserError(f"LoRA adapter {path} does not exist; give a directory written by gptlab finetune lora")
    for f in (config_file, weights_file):
        if not f.is_file():
            raise UserError(f"{f} is missing; {path} is not a complete LoRA adapter")
    try:
        meta = json.loads(config_file.read_text())
        fingerprint = meta.pop("base_fingerprint")
        base_model = meta.pop("base_model")
        if (not isinstance(base_model, str) or not isinstance(fingerprint, dict)
                or set(fingerprint) != {*FINGERPRINT_FIELDS, "weights_sha256"}
                or not isinstance(fingerprint["weights_sha256"], str)):
            raise ValueError("base_model or base_fingerprint is malformed")
        config = LoRAConfig.from_dict(meta)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_file} is corrupt ({type(e).__name__}: {e}); save the adapter again") from None
    except UserError as e:  # LoRAConfig's own complaint, said of this file
        raise UserError(f"{config_file}: {e}") from None
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights_file} cannot be read ({e}); the adapter is corrupt, save it again") from None
    others = sorted(k for k in tensors if not _is_lora(k))
    if others or not tensors:
        what = f"tensors other than lora_A/lora_B ({', '.join(others[:3])})" if others else "no tensors"
        raise UserError(f"{weights_file} holds {what}; it is not a gptlab LoRA adapter")
    return Adapter(path, config, base_model, fingerprint, tensors)


def check_base(model: GPT, adapter: Adapter) -> None:
    """Refuse a base model other than the one the adapter was trained on, saying which it was."""
    ours = base_fingerprint(model)
    theirs = adapter.base_fingerprint
    trained_on = f"LoRA adapter {adapter.path} was trained on {adapter.base_model!r}"
    differ = [f"{f} {theirs[f]} vs {ours[f]}" for f in FINGERPRINT_FIELDS if theirs[f] != ours[f]]
    if differ:
        raise UserError(f"{trained_on}, whose shape differs from this model's (adapter vs model: {'; '.join(differ)}); "
                        f"apply it to {adapter.base_model}")
    if theirs["weights_sha256"] != ours["weights_sha256"]:
        raise UserError(f"{trained_on}, whose weights differ from this model's (fingerprint "
                        f"{theirs['weights_sha256'][:12]} vs {ours['weights_sha256'][:12]}); "
                        f"apply it to {adapter.base_model}")


def apply_adapter(model: GPT, adapter: str | Path | Adapter) -> Adapter:
    """Add an adapter (a directory, or one already read by ``load_adapter``) to a base
    ``model`` and load its weights; return it.

    The model is checked against the adapter's base first. Afterwards the adapters are
    trainable and the base frozen, as after ``add_lora``; call ``merge_lora`` to serve it at
    full speed or to save it as an ordinary checkpoint.
    """
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    check_base(model, adapter)
    # The rank of every tensor is checked before add_lora allocates adapters of the declared rank.
    rank = adapter.config.rank
    off = sorted(k for k, t in adapter.tensors.items() if t.ndim != 2 or t.shape[k.endswith("lora_B")] != rank)
    if off:
        raise UserError(f"LoRA adapter {adapter.path}: tensor {off[0]} has shape {tuple(adapter.tensors[off[0]].shape)}, "
                        f"not rank {rank} as its {ADAPTER_CONFIG} says; the adapter is corrupt, save it again")
    add_lora(model, adapter.config)
    check_state_dict(adapter.tensors, lora_state_dict(model), f"LoRA adapter {adapter.path}")
    # Only the adapter tensors are given; the base's were checked by the fingerprint above.
    model.load_state_dict(adapter.tensors, strict=False)
    return adapter
