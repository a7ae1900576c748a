"""Open weights in and out: Hugging Face directories (hf.py), GGUF files (gguf.py), BERT
(bert.py) and offline named models (named.py)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gptlab.errors import UserError


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
               ([f"has tensor(s) the model does not use: {', '.join(unexpected[:5])}"] if unexpected else []) + wrong[:3]
    if problems:
        raise UserError(f"{source} does not fit the model: {'; '.join(problems)}")
