"""gptlab's GGUF export run by llama.cpp itself: greedy tokens against gptlab's, and llama.cpp's
decode speed, for each storage type (issue 17's check; issue 19 compares the engines' speed).

    pip install llama-cpp-python==0.3.36      # builds llama.cpp from source: ~5 minutes on 2 cores
    python benchmarks/gguf_llamacpp.py                                   # SmolLM2-135M-Instruct
    python benchmarks/gguf_llamacpp.py --model runs/chatbot-real/sft     # any MODEL gptlab reads

For each of f32, f16 and q8_0: ``gptlab export MODEL --format gguf --type T``, then llama.cpp
(through its Python bindings) tokenises the prompt (compared with gptlab's ids), continues it
greedily for --new tokens from its own logits, and the continuation is compared with gptlab's
fp32 greedy one: the first position where they part, if any. Speed: llama.cpp's decode
tokens/s over those tokens (one token per call, batch 1, --threads threads). Figures for
RESULTS.md; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptlab.weights.gguf_export import export_gguf
from gptlab.weights.load import load_checkpoint

PROMPT = "The three most important things to know about the ocean are"


def gptlab_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, fp32, the whole context recomputed each step (the reference, not fast)."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x)[0][:, -1:].argmax(-1)], dim=1)
    return x[0, len(prompt):].tolist()


def last_logits(llm) -> np.ndarray:
    """llama.cpp's logits for the last token it was fed, (vocab,). ``Llama.scores`` holds them only
    when the model was opened with logits_all=True (which costs the head over every prompt
    token); otherwise it stays zeros, and its argmax is token 0."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))


def greedy_timed(llm, prompt: list[int], n: int) -> tuple[list[int], float, float]:
    """n greedy tokens from an open llama.cpp model's logits (its cache reset first), the seconds
    to the first (the prompt and one step) and the decode tokens/s over the other n-1."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    out = [int(np.argmax(last_logits(llm)))]
    first = time.perf_counter() - start
    for _ in range(n - 1):
        llm.eval(out[-1:])
        out.append(int(np.argmax(last_logits(llm))))
    return out, first, (n - 1) / (time.perf_counter() - start - first)


def llama_cpp_greedy(path: Path, prompt: list[int], n: int, threads: int) -> tuple[list[int], float]:
    """n greedy tokens from llama.cpp's logits, and its decode tokens/s over the last n-1."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + n + 8, n_threads=threads, n_batch=512, verbose=False)
    ids, _, speed = greedy_timed(llm, prompt, n)
    return ids, speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens compared (default: 64)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("needs llama.cpp's Python bindings: pip install llama-cpp-python==0.3.36") from None
    ckpt = load_checkpoint(args.model)
    model = ckpt.model.float().eval()
    prompt = ckpt.tokenizer.encode(args.prompt)
    reference = gptlab_greedy(model, prompt, args.new)
    print(f"{args.model}: {model.num_parameters():,} parameters; prompt {args.prompt!r} ({len(prompt)} tokens); "
          f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads; torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"gptlab fp32 greedy: {ckpt.tokenizer.decode(reference)!r}")
    print(f"{'type':<6} {'file MB':>8} {'prompt ids':>10} {'same greedy tokens':>19} {'decode tok/s':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for storage in args.types.split(","):
            path = Path(tmp) / f"model-{storage}.gguf"
            export_gguf(ckpt, path, storage)
            from llama_cpp import Llama

            vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
            ids_ok = vocab.tokenize(args.prompt.encode(), add_bos=False, special=False) == prompt
            ids, speed = llama_cpp_greedy(path, prompt, args.new, args.threads)
            parted = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), None)
            same = f"all {args.new}" if parted is None else f"first {parted} of {args.new}"
            print(f"{storage:<6} {path.stat().st_size / 1e6:>8.1f} {'equal' if ids_ok else 'DIFFER':>10} "
                  f"{same:>19} {speed:>13.1f}", flush=True)
            if parted is not None:
                print(f"       llama.cpp from there: {ckpt.tokenizer.decode(ids[parted:])!r}")


if __name__ == "__main__":
    main()
