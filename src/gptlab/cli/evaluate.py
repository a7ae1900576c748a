"""``gptlab eval``: bits per byte on a text, multiple-choice accuracy, hits@1 on conversations."""

from __future__ import annotations

import argparse

from gptlab.cli.args import positive_int


def _eval(args: argparse.Namespace) -> None:
    from gptlab.inference.evaluate import EvalOptions, run_eval

    options = EvalOptions(window=args.window, stride=args.stride, k=args.k, seed=args.seed, limit=args.limit,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype, quantize=args.quantize,
                          as_json=args.json)
    run_eval(args.model, corpus=args.corpus, choices=args.choices, chat=args.chat, options=options)


def add_eval(sub: argparse._SubParsersAction) -> None:
    from gptlab.device import DTYPE_CHOICES, DTYPE_HELP

    p = sub.add_parser("eval", help="bits per byte, multiple-choice accuracy or hits@1 of a model",
                       description="Evaluate MODEL on one of: a text (loss, perplexity and bits per byte, which "
                                   "compare across vocabularies), multiple-choice records scored as "
                                   "lm-evaluation-harness does (acc, acc_norm), or conversations (hits@1: the true "
                                   "reply against K-1 replies of other conversations, ranked by log-likelihood and "
                                   "by log-likelihood per character).")
    p.add_argument("model", metavar="MODEL",
                   help="checkpoint or run directory, named model (smollm2-135m-instruct), Hugging Face directory, "
                        ".gguf file or hf:ORG/NAME")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--corpus", metavar="C",
                      help="a text: a corpus name (shakespeare-tiny), file, folder, glob or URL")
    task.add_argument("--choices", metavar="FILE",
                      help='multiple-choice JSONL: {"context": ..., "endings": [...], "label": INDEX} per line')
    task.add_argument("--chat", metavar="FILE",
                      help='chat JSONL: {"messages": [{"role": ..., "content": ...}, ...]} per line; the last '
                           "assistant message is the reply to select; lines with the same "
                           "\"conversation\": ID (items of one conversation) are never each other's distractors")
    p.add_argument("--window", type=positive_int, metavar="N", default=None,
                   help="--corpus: input tokens per window (at most the model's block size; default: the block size, "
                        "or fewer where a window's logits would pass 2 GiB: 2,048 for Gemma 3's vocabulary)")
    p.add_argument("--stride", type=positive_int, metavar="N", default=None,
                   help="--corpus: tokens between window starts; below --window, windows overlap and every token "
                        "after the first window keeps at least window-stride+1 tokens of context (default: the "
                        "window, non-overlapping; window-1 for a model that reads a BOS first, such as Gemma, "
                        "whose windows each start with one)")
    p.add_argument("--k", type=positive_int, metavar="N", default=None,
                   help="--chat: candidates per conversation, the true reply included (default: 5)")
    p.add_argument("--seed", type=int, metavar="N", default=None,
                   help="--chat: seed of the distractors' draw (default: 0)")
    p.add_argument("--limit", type=positive_int, metavar="N", default=None,
                   help="evaluate only the first N windows, records or conversations")
    p.add_argument("--batch-size", type=positive_int, metavar="N", default=8,
                   help="sequences per forward pass, fewer where they would be more than 8,192 tokens (default: 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=f"{DTYPE_HELP} (default: auto)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="score with the weights and activations in int8, as --quantize int8 decodes (default: off)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_eval)
