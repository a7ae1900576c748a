"""Decoding speed of every engine in turns: gptlab (fp32, int8, compiled), transformers and llama.cpp.

    python benchmarks/engine_decode.py                                # gptlab, int8, transformers, llama.cpp
    python benchmarks/engine_decode.py --engines gptlab,compiled --compile-mode max-autotune-no-cudagraphs
    pip install llama-cpp-python==0.3.36                              # llama.cpp: ~5 minutes of compiling

SmolLM2-135M-Instruct, greedy. Batch 1, a 64-token prompt, 128 new tokens (EOS ignored): time to
first token (prefill plus one step) and decode tokens/s over the remaining 127. The engines take
turns, run by run, so that load from other work on a shared machine falls on all alike; the
figures are medians of --repeat runs, and each ratio is the median of the per-round ratios.
Then the tokens/s of a batch of 8 prompts of the same length, also in turns (llama.cpp's Python
bindings decode one sequence, so it is left out there).

- gptlab: the eager engine in fp32, a KV cache that grows with the text.
- int8: the same with ``--quantize int8`` (``quantize_int8`` as the engine calls it: every
  Linear, the head included, computed in int8 by fbgemm, smoothed by the calibration text).
- bf16: the same with ``--dtype bf16`` (weights stored in bf16; fast where the CPU has AVX-512
  BF16 or AMX, emulated and slow elsewhere). Not in the default list.
- int8-compiled: int8 and ``compile_decode`` together (``--quantize int8 --compile``): the
  one-token step over a static KV cache compiled by torch.compile, fbgemm's product an operator
  of the graph and the float work around it fused.
- compiled: ``compile_decode`` (torch.compile of the one-token step over a static KV cache), fp32.
  Not in the default list.
  Compile times are reported on their own: the first generation at each batch size (compiling)
  minus a later one of the same length (a minute or two with an empty inductor cache).
- transformers: built from gptlab's own Hugging Face export of the same checkpoint, fp32.
- llama.cpp-f32, llama.cpp-q8_0, llama.cpp-q4_1: llama.cpp (through llama-cpp-python, when it is
  installed) running gptlab's own GGUF export of the same checkpoint at that storage type.

Bandwidth: the bytes of weights each engine reads per token (every matrix once: the head, which
is SmolLM2's embedding, included; a lookup reads one row of the embedding, not counted) times
its tokens/s, next to this machine's read bandwidth (summing a 1 GiB float32 tensor).

Greedy agreement with gptlab fp32: the first 16 greedy tokens of each engine on the timing
prompt (random token ids), and on --questions chat prompts (ten questions in the model's chat
template): for how many of them all 16 tokens equal fp32's, and the median count of tokens
before the first that differs.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

from gptlab.inference.compiled_decode import compile_decode
from gptlab.inference.engine import Engine, prepare_for_decoding
from gptlab.inference.quantize import Int8Linear, checkpoint_calibration
from gptlab.inference.sampling import generate
from gptlab.weights.gguf_export import export_gguf
from gptlab.weights.hf import export_hf
from gptlab.weights.load import load_checkpoint

from gguf_llamacpp import greedy_timed  # this folder is on sys.path when a benchmark runs

LLAMA_CPP = ("llama.cpp-f32", "llama.cpp-q8_0", "llama.cpp-q4_1")
COMPILED = ("compiled", "int8-compiled")
ENGINES = ("gptlab", "int8", "int8-compiled", "bf16", "compiled", "transformers", *LLAMA_CPP)
DEFAULT = ("gptlab", "int8", "int8-compiled", "transformers", *LLAMA_CPP)


def ours(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    for i, _ in enumerate(generate(model, prompt, new, temperature=0.0)):
        if i == 0:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first, (new - 1) * prompt.size(0) / (total - first)


def theirs(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
    total = time.perf_counter() - start
    return first, (new - 1) * prompt.size(0) / (total - first)


def llama_cpp(llm, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """One sequence through llama.cpp: prompt, then ``new`` greedy tokens from its logits."""
    _, first, speed = greedy_timed(llm, prompt[0].tolist(), new)
    return first, speed


def greedy_ids(name: str, model, prompt: torch.Tensor, n: int) -> list[int]:
    if name.startswith("llama.cpp"):
        return greedy_timed(model, prompt[0].tolist(), n)[0]
    if name == "transformers":
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[0, -n:].tolist()
    return [int(t[0]) for t in generate(model, prompt, n, temperature=0.0)]


QUESTIONS = ["What is the capital of France?", "How do I boil an egg?", "Why is the sky blue?",
             "Write a haiku about the sea.", "What are three tips for staying healthy?",
             "Explain what a neural network is.", "What is the difference between a list and a tuple in Python?",
             "Give me a name for a pet turtle.", "How far is the Moon from the Earth?",
             "Summarise the plot of Romeo and Juliet in two sentences."]


def chat_prompts(ckpt, n: int) -> list[torch.Tensor]:
    """The first ``n`` of ``QUESTIONS``, each as a user turn in the model's chat template, (1, T)."""
    engine = Engine(ckpt)
    return [torch.tensor([engine.chat_prompt([{"role": "user", "content": q}], 16).ids]) for q in QUESTIONS[:n]]


def agreement(engines: dict, prompts: list[torch.Tensor], n: int = 16) -> None:
    """Greedy agreement of each engine with the first (gptlab fp32) on ``prompts``: prompts whose
    first ``n`` tokens all equal, and the median count of equal tokens before the first that differs."""
    runs = {name: [greedy_ids(name, m, p, n) for p in prompts] for name, (_, m) in engines.items()}
    reference = runs[next(iter(runs))]
    for name, ids in runs.items():
        equal = [next((i for i, (a, b) in enumerate(zip(x, r)) if a != b), n) for x, r in zip(ids, reference)]
        print(f"{name:15} greedy agreement on {len(prompts)} chat prompts: all {n} tokens equal on "
              f"{sum(e == n for e in equal)}, median {statistics.median(equal):.0f} tokens before the first "
              f"difference ({', '.join(map(str, equal))})")


def rounds(engines: dict, prompt: torch.Tensor, new: int, repeat: int) -> list[dict[str, tuple[float, float]]]:
    """``repeat`` rounds, each running every engine once, in turn."""
    return [{name: fn(m, prompt, new) for name, (fn, m) in engines.items()} for _ in range(repeat)]


def report(runs: list[dict], batch: int, weight_bytes: dict[str, int]) -> None:
    names = list(runs[0])
    for name in names:
        ttft = statistics.median(r[name][0] for r in runs)
        tps = statistics.median(r[name][1] for r in runs)
        first = f"time to first token {ttft * 1e3:7.1f} ms, " if batch == 1 else ""
        reads = f", weights read {weight_bytes[name] * tps / batch / 1e9:5.1f} GB/s" if name in weight_bytes else ""
        print(f"{name:15} batch {batch}: {first}decode {tps:6.1f} tok/s{reads}", flush=True)
    for base in ("gptlab", "transformers", "llama.cpp-q8_0"):
        if base in names:
            ratios = [f"{name} {statistics.median(r[name][1] / r[base][1] for r in runs):.2f}x"
                      for name in names if name != base]
            print(f"decode against {base}, batch {batch}: {', '.join(ratios)}")


def read_bandwidth(repeat: int = 5) -> float:
    """This machine's memory read bandwidth, GB/s: summing a 1 GiB float32 tensor (median)."""
    x = torch.ones(2**28)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times) / 1e9


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of the matrices one decoded token reads: every Linear (the head included), once."""
    return sum(m.nbytes if isinstance(m, Int8Linear) else m.weight.numel() * m.weight.element_size()
               for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear)))


def load_llama_cpp(ckpt, names: list[str], folder: str, n_ctx: int) -> dict:
    """llama.cpp engines on gptlab's GGUF exports, {name: (fn, Llama)}; none without the bindings."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp left out: pip install llama-cpp-python==0.3.36 (builds from source, ~5 minutes)")
        return {}
    engines = {}
    for name in (n for n in names if n in LLAMA_CPP):
        path = os.path.join(folder, name + ".gguf")
        export_gguf(ckpt, path, name.split("-")[1])
        llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
        llm.file_bytes = os.path.getsize(path)
        engines[name] = (llama_cpp, llm)
    return engines


def build_engines(ckpt, names: list[str], args: argparse.Namespace, gguf_dir: str) -> tuple[dict, str]:
    """{name: (timing function, model)} for the engines asked for, and the versions to print."""
    model = ckpt.model.eval()
    engines, versions = {}, ""
    if "gptlab" in names:
        engines["gptlab"] = (ours, model)
    if "int8" in names:
        calibration = checkpoint_calibration(ckpt)
        engines["int8"] = (ours, prepare_for_decoding(copy.deepcopy(model), quantize="int8", calibration=calibration))
    if "int8-compiled" in names:
        calibration = checkpoint_calibration(ckpt)
        int8 = prepare_for_decoding(copy.deepcopy(model), quantize="int8", calibration=calibration)
        compile_decode(int8, mode=args.compile_mode)
        engines["int8-compiled"] = (ours, int8)
    if "bf16" in names:
        engines["bf16"] = (ours, prepare_for_decoding(copy.deepcopy(model), "bf16"))
    if "compiled" in names:
        compiled = copy.deepcopy(model)
        compile_decode(compiled, mode=args.compile_mode)
        engines["compiled"] = (ours, compiled)
    if "transformers" in names:
        import transformers

        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_hf(ckpt, d, family=ckpt.config.arch)
            engines["transformers"] = (theirs, transformers.AutoModelForCausalLM.from_pretrained(d).eval())
        versions += f", transformers {transformers.__version__}"
    engines.update(load_llama_cpp(ckpt, names, gguf_dir, args.prompt_tokens + args.new_tokens + 8))
    if any(n in engines for n in LLAMA_CPP):
        import llama_cpp

        versions += f", llama-cpp-python {llama_cpp.__version__}"
    return engines, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--engines", default=",".join(DEFAULT), help=f"comma-separated, from {', '.join(ENGINES)}")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled engine")
    ap.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's choice)")
    ap.add_argument("--questions", type=int, default=10, help="chat prompts for greedy agreement (at most 10)")
    args = ap.parse_args()
    names = args.engines.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    ckpt = load_checkpoint(args.model)
    gguf_dir = tempfile.TemporaryDirectory()
    engines, versions = build_engines(ckpt, names, args, gguf_dir.name)
    weight_bytes = {name: (m.file_bytes if name in LLAMA_CPP else bytes_per_token(m))
                    for name, (_, m) in engines.items()}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1000, 20000, (1, args.prompt_tokens), generator=g)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads{versions}; {args.model}, prompt {args.prompt_tokens}, new "
          f"{args.new_tokens}, greedy, compile mode {args.compile_mode}; load average before: "
          f"{os.getloadavg()[0]:.2f}")
    print(f"memory read bandwidth (sum of 1 GiB): {read_bandwidth():.1f} GB/s; weights read per token: "
          + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in weight_bytes.items()))
    with torch.no_grad():
        ids = {name: greedy_ids(name, m, prompt, 16) for name, (_, m) in engines.items()}
        reference = ids[next(iter(ids))]
        print("first 16 greedy tokens equal to " + next(iter(ids)) + "'s: "
              + ", ".join(f"{k} {'yes' if v == reference else 'no'}" for k, v in ids.items()))
        agreement(engines, chat_prompts(ckpt, args.questions))
        batch8 = prompt.repeat(8, 1)
        for p, new in ((prompt, args.new_tokens), (batch8, args.new_tokens // 2)):
            for name in (n for n in COMPILED if n in engines):
                # Compiling happens in the first run at a new batch size and cache length.
                took = [ours(engines[name][1], p, new) for _ in range(2)]
                total = [(new - 1) * p.size(0) / tps + ttft for ttft, tps in took]
                print(f"{name}, batch {p.size(0)}: compile {total[0] - total[1]:.1f} s "
                      f"(first run {total[0]:.1f} s, second {total[1]:.1f} s)", flush=True)
        rounds({k: v for k, v in engines.items() if k not in COMPILED}, prompt, 4, 1)  # warm-up (compiled just were)
        report(rounds(engines, prompt, args.new_tokens, args.repeat), 1, weight_bytes)
        batched = {k: v for k, v in engines.items() if k not in LLAMA_CPP}
        report(rounds(batched, batch8, args.new_tokens // 2, max(1, args.repeat // 2)), 8, weight_bytes)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    gguf_dir.cleanup()


if __name__ == "__main__":
    main()
