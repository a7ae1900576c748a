"""``gptlab eval MODEL``: score any model on a text (``--corpus``), multiple-choice records
(``--choices``) or conversations (``--chat``), and print a small table or one JSON object.

The tasks themselves are ``eval_text``, ``eval_choices`` and ``eval_chat``, all scored by
``eval_scoring.Scorer``. Inputs are read and checked before the model is loaded, so a bad
record is reported at once rather than after a minute of loading a large model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from gptlab.errors import UserError


@dataclass
class EvalOptions:
    window: int | None = None
    """--corpus: input tokens per window (default: the model's block size, fewer for a large
    vocabulary: ``eval_text.DEFAULT_WINDOW_LOGITS``)"""
    stride: int | None = None
    """--corpus: tokens between window starts (default: the window, non-overlapping)"""
    k: int | None = None
    """--chat: candidates per conversation, the true reply included (default: 5)"""
    seed: int | None = None
    """--chat: seed of the distractor draw (default: 0)"""
    limit: int | None = None
    """the first N windows, records or conversations only"""
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    """--quantize int8: score with int8 weights and activations (``gptlab.inference.quantize``)"""
    as_json: bool = False
    progress: bool = True

    def check(self, task: str) -> None:
        """Every flag that does not apply to ``task``, or is out of range, in one error."""
        only = {"--window": ("--corpus", self.window), "--stride": ("--corpus", self.stride),
                "--k": ("--chat", self.k), "--seed": ("--chat", self.seed)}
        problems = [f"{flag} applies to {where} only" for flag, (where, value) in only.items()
                    if value is not None and task != where]
        if self.k is not None and self.k < 2:
            problems.append(f"--k must be at least 2 (the true reply and one distractor), got {self.k}")
        if problems:
            raise UserError("; ".join(problems))


def run_eval(model: str, corpus: str | None = None, choices: str | None = None, chat: str | None = None,
             options: EvalOptions | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on the one task given, print the result, and return it as a dict."""
    options = options or EvalOptions()
    tasks = {"--corpus": corpus, "--choices": choices, "--chat": chat}
    given = [flag for flag, value in tasks.items() if value is not None]
    if len(given) != 1:
        raise UserError(f"give one of --corpus, --choices or --chat (got {', '.join(given) or 'none'})")
    task = given[0]
    options.check(task)
    evaluate = {"--corpus": _corpus_task, "--choices": _choices_task, "--chat": _chat_task}[task](tasks[task], options)
    scorer, checkpoint, precision = _load(model, options)
    result = evaluate(scorer, checkpoint)
    report = {"model": model, "task": task[2:], task[2:]: tasks[task], "parameters": checkpoint.model.num_parameters(),
              "device": str(scorer.device), "dtype": precision.name,
              **({"quantize": options.quantize} if options.quantize else {}), **result.to_dict()}
    print(json.dumps(report) if options.as_json else format_report(report))
    return report


# Each task reads and checks its input now and returns what scores it once the model is loaded.
Task = Callable[[Any, Any], Any]


def _corpus_task(spec: str, options: EvalOptions) -> Task:
    from gptlab.data.sources import load_corpus
    from gptlab.inference.eval_text import evaluate_text

    text = load_corpus(spec).text
    return lambda scorer, ckpt: evaluate_text(scorer, ckpt.tokenizer, text, f"--corpus {spec}", options.window,
                                              options.stride, options.limit)


def _choices_task(path: str, options: EvalOptions) -> Task:
    from gptlab.inference.eval_choices import evaluate_choices, read_choices

    items = read_choices(path)[: options.limit]
    return lambda scorer, ckpt: evaluate_choices(scorer, ckpt.tokenizer, items)


def _chat_task(path: str, options: EvalOptions) -> Task:
    from gptlab.inference.eval_chat import ChatTemplate, check_candidates, evaluate_chat, read_dialogues
    from gptlab.tokenizers.chat_template import chat_format

    dialogues = read_dialogues(path)
    k, seed = 5 if options.k is None else options.k, options.seed or 0
    check_candidates(dialogues, k, path)
    return lambda scorer, ckpt: evaluate_chat(scorer, ckpt.tokenizer, ChatTemplate(*chat_format(ckpt)), dialogues,
                                              k, seed, options.limit, path)


def _load(model: str, options: EvalOptions):
    """The checkpoint, a scorer of its model and the precision it runs in."""
    from gptlab.device import pick_device, pick_dtype
    from gptlab.inference.eval_scoring import Scorer
    from gptlab.tokenizers.chat_template import bos_id
    from gptlab.weights.load import load_checkpoint

    device = pick_device(options.device)
    precision = pick_dtype(options.dtype, device)
    checkpoint = load_checkpoint(model, device=device)
    if options.quantize == "int8":
        from gptlab.inference.quantize import checkpoint_calibration, quantize_int8

        quantize_int8(checkpoint.model, checkpoint_calibration(checkpoint))
    scorer = Scorer(checkpoint.model, device, precision.dtype, options.batch_size, options.progress,
                    bos_id=bos_id(checkpoint))
    return scorer, checkpoint, precision


#: the report's rows as the table shows them: (key, label, format)
ROWS = (
    ("model", "model", "{}"), ("corpus", "corpus", "{}"), ("choices", "choices", "{}"), ("chat", "chat", "{}"),
    ("parameters", "parameters", "{:,}"),
    ("device", "device", "{}"), ("dtype", "dtype", "{}"), ("quantize", "quantize", "{}"),
    ("tokens", "tokens", "{:,}"), ("predicted", "predicted", "{:,}"), ("bytes", "bytes", "{:,}"),
    ("windows", "windows", "{:,}"), ("window", "window", "{:,} tokens"), ("stride", "stride", "{:,} tokens"),
    ("loss", "loss", "{:.4f} nats/token"), ("perplexity", "perplexity", "{:.3f}"),
    ("bits_per_byte", "bits per byte", "{:.4f}"),
    ("items", "items", "{:,}"), ("acc", "acc", "{:.4f}"), ("acc_norm", "acc_norm", "{:.4f}"), ("k", "k", "{}"),
    ("hits_at_1", "hits@1", "{:.4f}"), ("hits_at_1_norm", "hits@1 per char", "{:.4f}"),
    ("chance", "chance", "{:.4f}"),
    ("reply_bits_per_byte", "reply bits/byte", "{:.4f}"),
)


def format_report(report: dict[str, Any]) -> str:
    """The report as aligned ``label  value`` lines, in a fixed order."""
    width = max(len(label) for _, label, _ in ROWS)
    return "\n".join(f"{label:<{width}}  {fmt.format(report[key])}" for key, label, fmt in ROWS if key in report)
