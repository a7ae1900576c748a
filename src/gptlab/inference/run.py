"""``gptlab sample``: load a checkpoint and stream generated text to stdout."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from gptlab.errors import UserError
from gptlab.inference.engine import Engine, SamplingParams


def newest_run(root: Path = Path("runs")) -> Path:
    """The most recently written run directory under ``root`` that holds a checkpoint."""
    runs = [p for p in root.glob("*") if (p / "best" / "model.safetensors").exists()
            or (p / "last" / "model.safetensors").exists()] if root.is_dir() else []
    if not runs:
        raise UserError(f"no trained model found under {root}/; train one with `gptlab train` or give MODEL")
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in p.rglob("model.safetensors")))


def run_sample(model_path: str | None, prompt: str = "\n", num_samples: int = 1, params: SamplingParams | None = None,
               device: str = "auto", dtype: str = "auto", compile: bool = False,
               quantize: str | None = None, speculate: int = 0) -> list[str]:
    """Print ``num_samples`` continuations of ``prompt`` as they are generated; return them.

    The prompt is raw text, no chat template, and each sample runs to ``params.max_new_tokens``
    (``ignore_eos``). ``dtype``, ``compile``, ``quantize`` and ``speculate`` are the engine's (see
    ``Engine``)."""
    from gptlab.device import pick_device
    from gptlab.weights.load import load_checkpoint

    params = replace(params or SamplingParams(), ignore_eos=True)
    params.check()
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue (the default is a newline)")
    path = Path(model_path) if model_path is not None else newest_run()
    dev = pick_device(device)
    engine = Engine(load_checkpoint(path, device=dev), dev, dtype=dtype, compile=compile, quantize=quantize,
                    speculate=speculate)
    prompt_ids = engine.encode_prompt(prompt)
    # One generator for every sample: with a seed, the samples differ from each other and the
    # whole output repeats exactly.
    generator = engine.seeded_generator(params.seed)
    samples = []
    for n in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {n + 1} ---")
        sys.stdout.write(prompt)
        pieces = [prompt]
        for piece in engine.stream(prompt_ids, params, generator):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
        sys.stdout.write("\n")
        samples.append("".join(pieces))
    return samples
