"""Open weights in and out: Hugging Face directories (hf.py), GGUF files (gguf.py), BERT
(bert.py) and offline named models (named.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from gptlab.errors import UserError, names

if TYPE_CHECKING:
    from gptlab.model.config import ModelConfig
    from gptlab.model.transformer import GPT


def check_state_dict(state: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor | torch.Size],
                     source: str) -> None:
    """Refuse weights that do not fit the model exactly: every tensor present, none extra, every
    shape equal. One line names the first offenders and both shapes; ``source`` says whose
    weights they are (a file or directory)."""
    shape = {k: (v.shape if isinstance(v, torch.Tensor) else torch.Size(v)) for k, v in expected.items()}
    missing = sorted(k for k in shape if state.get(k) is None)
    unexpected = sorted(set(state) - set(shape))
    wrong = [f"{k} has shape {tuple(state[k].shape)} but the model needs {tuple(s)}" for k, s in shape.items()
             if state.get(k) is not None and state[k].shape != s]
    problems = ([f"lacks tensor(s) {', '.join(missing[:5])}"] if missing else []) + \
               ([f"has tensor(s) the model does not use: {names(unexpected[:5])}"] if unexpected else []) + wrong[:3]
    if problems:
        raise UserError(f"{source} does not fit the model: {'; '.join(problems)}")


#: non-learned buffers (RoPE tables, (block_size, head_dim) each) may take at most this many
#: bytes, or as many as the weights when those are larger (a 1M-token context at head_dim 128
#: needs 1 GiB, with a model of several GiB); a corrupt context length of 2^40 would need petabytes
BUFFER_BYTES_FLOOR = 64 * 2**20


def build_checked(config: "ModelConfig", state: Mapping[str, torch.Tensor | None], source: str) -> "GPT":
    """``build_model(config)`` (a GPT, or the bigram table), built only after its shapes were checked
    against ``state`` on the meta device (no memory), so a config that declares a huge model is
    refused before allocation."""
    from gptlab.model.transformer import build_model

    # A block is a few Python modules even on the meta device: count layers before building any.
    layers = {k.split(".")[1] for k in state if k.startswith("layers.")}
    if config.arch != "bigram" and config.n_layer != len(layers):
        raise UserError(f"{source} does not fit the model: the config says n_layer={config.n_layer} but the weights "
                        f"hold {len(layers)} layers")
    try:
        with torch.device("meta"):
            skeleton = build_model(config)
    except RuntimeError as e:  # "Storage size calculation overflowed": sizes past 2^63 bytes
        raise UserError(f"{source} does not fit the model: its config declares tensors too large to exist "
                        f"({str(e).splitlines()[0][:120]})") from None
    check_state_dict(state, skeleton.state_dict(), source)
    weights = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    buffers = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    if buffers > max(weights, BUFFER_BYTES_FLOOR):
        raise UserError(f"{source}: block_size={config.block_size} would need {buffers / 2**30:.1f} GiB of RoPE tables "
                        "for a model this size; the context length is corrupt")
    return build_model(config)
