"""``gptlab sample``, ``gptlab chat`` and ``gptlab serve``: the commands that generate text."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from gptlab.cli.args import positive_int

if TYPE_CHECKING:
    from gptlab.inference.engine import SamplingParams

# --- the flags of every command that generates ------------------------------------------------

def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p, --min-p, --repetition-penalty, --greedy and
    --seed, with ``SamplingParams``' defaults: the same for every command that takes them."""
    from gptlab.inference.engine import SamplingParams

    default = SamplingParams()
    p.add_argument("--max-new-tokens", type=positive_int, default=default.max_new_tokens,
                   help=f"most tokens to generate per sample or answer (default: {default.max_new_tokens})")
    p.add_argument("--temperature", type=float, default=default.temperature,
                   help=f"divide logits by this; lower is more conservative, 0 is greedy (default: "
                        f"{default.temperature:g})")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only from the smallest set of tokens whose probability reaches p")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min_p times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="above 1 discourages repeating earlier tokens (default: off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible output")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The ``SamplingParams`` that ``add_sampling_flags``' flags ask for."""
    from gptlab.inference.engine import SamplingParams

    return SamplingParams(temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --compile, --quantize and --speculate: where and how the commands that generate run
    the model."""
    from gptlab.device import DECODING_DTYPE_HELP, DTYPE_CHOICES

    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=f"{DECODING_DTYPE_HELP} (default: auto)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step (torch.compile over a static KV cache): the same tokens "
                        "(with --quantize int8, but where two are near-tied), ~1.2x faster decoding on a CPU (2x with "
                        "--quantize int8), after a one-off compile of a minute or more")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="compute every linear layer, the head included, in int8 on the CPU (fbgemm's kernels): a "
                        "quarter of the weight bytes per token, 1.3-2.3x faster decoding than fp32 (AVX2 to AVX-512 "
                        "VNNI; 2.7x with --compile on AVX2), slightly higher perplexity (measured in "
                        "benchmarks/RESULTS.md, 'Decoding against llama.cpp')")
    p.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="greedy answers (--greedy, temperature 0): draft up to N tokens a step by copying what "
                        "followed the last words where they occurred before in the context, and keep those the "
                        "model agrees with; the same tokens, faster only when the answer copies long spans of "
                        "its context (default: 0, off)")


# --- gptlab sample -------------------------------------------------------------------------

def _sample(args: argparse.Namespace) -> None:
    from gptlab.inference.run import run_sample

    run_sample(args.model, prompt=args.prompt, num_samples=args.num_samples, params=sampling_params(args),
               device=args.device, dtype=args.dtype, compile=args.compile, quantize=args.quantize,
               speculate=args.speculate)


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained model",
                       description="Generate text from a checkpoint, streaming it to stdout.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a run directory or checkpoint directory (default: the newest run under runs/)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="how many samples (default: 1)")
    add_sampling_flags(p)
    add_decoding_flags(p)
    p.set_defaults(func=_sample)


# --- gptlab chat ---------------------------------------------------------------------------

def _chat(args: argparse.Namespace) -> None:
    from gptlab.inference.chat import run_chat

    run_chat(args.model, system=args.system, params=sampling_params(args), device=args.device, dtype=args.dtype,
             compile=args.compile, quantize=args.quantize, speculate=args.speculate)


def add_chat_model_arg(p: argparse.ArgumentParser) -> None:
    """The optional MODEL of the commands that talk to a model; the default works offline."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint, run directory, Hugging Face directory, .gguf file or named model "
                        "(default: smollm2-135m-instruct, which works offline)")


def add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal",
                       description="A multi-turn chat in the terminal, streamed as it is generated. Commands: "
                                   "/reset, /system TEXT, /temp X, /help, /quit; Ctrl-C stops the current answer.")
    add_chat_model_arg(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_flags(p)
    add_decoding_flags(p)
    p.set_defaults(func=_chat)


# --- gptlab serve --------------------------------------------------------------------------

#: ``gptlab serve`` flags that set a field of ``gptlab.serve.limits.Limits`` (the help repeats its defaults)
SERVE_LIMIT_FLAGS = {"max_body_bytes": "largest request body in bytes (default: 1048576); more gets 413",
                     "max_messages": "most messages in one chat request (default: 256)",
                     "max_input_chars": "most characters of input: all message contents, or a prompt "
                                        "(default: 100000)",
                     "max_tokens": "largest max_tokens a request may ask for (default: 4096)"}


def _serve(args: argparse.Namespace) -> None:
    from gptlab.serve import run_server
    from gptlab.serve.limits import Limits

    limits = Limits(**{name: getattr(args, name) for name in SERVE_LIMIT_FLAGS if getattr(args, name) is not None})
    run_server(args.model, host=args.host, port=args.port, api_key=args.api_key, device=args.device, limits=limits,
               max_concurrency=args.max_concurrency, max_queue=args.max_queue, shutdown_grace=args.shutdown_grace,
               dtype=args.dtype, compile=args.compile, quantize=args.quantize, speculate=args.speculate)


def add_serve(sub: argparse._SubParsersAction) -> None:
    def at_least_zero(kind: type):  # an argparse type: ``kind`` (int or float), 0 allowed
        def parse(s: str) -> int | float:
            try:
                v = kind(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
            if not 0 <= v < float("inf"):
                raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
            return v
        return parse

    p = sub.add_parser("serve", help="serve a model: a chat web page and an OpenAI-compatible API",
                       description="A chat page at / and an OpenAI-compatible API at /v1 (models, chat/completions, "
                                   "completions; streaming or not). SIGTERM or Ctrl-C stops it gracefully.")
    add_chat_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    add_decoding_flags(p)
    p.add_argument("--max-concurrency", type=positive_int, default=1, help="generations run at once (default: 1)")
    p.add_argument("--max-queue", type=at_least_zero(int), default=8,
                   help="requests that may wait for a turn; more get 503 (default: 8)")
    p.add_argument("--shutdown-grace", type=at_least_zero(float), default=5.0,
                   help="seconds that running answers get to finish on SIGTERM or Ctrl-C before they are cut "
                        "(default: 5)")
    for name, help_text in SERVE_LIMIT_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=positive_int, default=None, help=help_text)
    p.set_defaults(func=_serve)
