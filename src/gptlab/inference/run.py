"""``gptlab sample``: load a checkpoint and stream generated text to stdout."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from gptlab.errors import UserError
from gptlab.inference.sampling import check_sampling_args, generate
from gptlab.tokenizers import Tokenizer


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of token ids into text pieces, holding back bytes until they form whole
    UTF-8 characters (a byte-level token can end in the middle of an emoji)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        piece = decoder.decode(tokenizer.decode_bytes([i]))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def newest_run(root: Path = Path("runs")) -> Path:
    """The most recently written run directory under ``root`` that holds a checkpoint."""
    runs = [p for p in root.glob("*") if (p / "best" / "model.safetensors").exists()
            or (p / "last" / "model.safetensors").exists()] if root.is_dir() else []
    if not runs:
        raise UserError(f"no trained model found under {root}/; train one with `gptlab train` or give MODEL")
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in p.rglob("model.safetensors")))


def run_sample(model_path: str | None, prompt: str = "\n", num_samples: int = 1, max_new_tokens: int = 500,
               temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
               min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
               device: str = "auto", dtype: str = "auto", compile: bool = False,
               quantize: str | None = None) -> list[str]:
    """Print ``num_samples`` continuations of ``prompt`` as they are generated; return them.
    ``dtype``, ``compile`` and ``quantize`` are the engine's (see ``prepare_for_decoding``)."""
    from gptlab.device import pick_device
    from gptlab.inference.engine import prepare_for_decoding
    from gptlab.weights.load import load_checkpoint

    check_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    path = Path(model_path) if model_path is not None else newest_run()
    dev = pick_device(device)
    loaded = load_checkpoint(path, device=dev)
    model, tok = prepare_for_decoding(loaded.model, dtype, compile, quantize), loaded.tokenizer
    if not prompt:
        raise UserError("--prompt is empty; give some text to continue (the default is a newline)")
    prompt_ids = tok.encode(prompt)
    generator = torch.Generator(device=dev)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    samples = []
    for n in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {n + 1} ---")
        sys.stdout.write(prompt)
        pieces = [prompt]
        idx = torch.tensor([prompt_ids], device=dev)
        with torch.no_grad():
            tokens = (int(t[0]) for t in generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, min_p=min_p, generator=generator,
                                                 repetition_penalty=repetition_penalty))
            for piece in stream_decode(tok, tokens):
                sys.stdout.write(piece)
                sys.stdout.flush()
                pieces.append(piece)
        sys.stdout.write("\n")
        samples.append("".join(pieces))
    return samples
