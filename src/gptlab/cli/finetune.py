"""``gptlab finetune``, ``gptlab classify`` and ``gptlab merge``."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from gptlab.cli.args import add_config_flags, fraction, given, positive_int, refuse_overwrite
from gptlab.errors import UserError, flag

# --- gptlab finetune / merge ---------------------------------------------------------------

FINETUNE_TRAIN_FLAGS: list[str] = []
SFT_FLAGS: list[str] = []


def _finetune_out(args: argparse.Namespace, kind: str) -> Path:
    """--out, checked like a training run's; by default a fresh runs/KIND-MODEL folder."""
    import re

    from gptlab.train.run import claim_out, fresh_run_dir

    if args.out is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model.rstrip("/")).name)[-60:] or "model"
        return fresh_run_dir(f"{kind}-{name}")
    out = Path(args.out)
    claim_out(out, args.force)
    return out


def _report_finetune(result, took: float, what: str) -> int:
    from gptlab.train.run import summary_line

    print(summary_line(result, took))
    print(f"{what}: {result.run_dir / 'best'}   (metrics.csv and loss.png in {result.run_dir})")
    return 130 if result.stopped == "interrupted" else 0


def _finetune_sft(args: argparse.Namespace) -> int:
    import time

    from gptlab.config import finetune_config
    from gptlab.finetune.sft import SFTOptions, run_sft
    from gptlab.model.lora import LoRAConfig, lora_flag
    from gptlab.train import distributed

    kind = "lora" if args.lora else "sft"
    cfg = finetune_config(kind, given(args, FINETUNE_TRAIN_FLAGS))
    lora = (LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                       targets=args.lora_targets).validate(lora_flag) if args.lora else None)
    options = SFTOptions(**given(args, SFT_FLAGS), lora=lora).validate(flag)
    # Under torchrun the command joins the process group first, so that rank 0 alone claims --out.
    with distributed.process_group(cfg.device) as d:
        out = distributed.decided_by_main(d, partial(_finetune_out, args, kind))
        start = time.perf_counter()
        result = run_sft(args.model, args.data, out, cfg, options, show_progress=not args.no_progress, d=d)
    if not d.is_main:
        return 130 if result.stopped == "interrupted" else 0
    if result.sample:
        print(f"\n--- a held-out question, answered ---\n{result.sample}\n-------------------------------------")
    code = _report_finetune(result, time.perf_counter() - start, "adapter" if args.lora else "checkpoint")
    print(f"try: gptlab chat {out}" + (f"   or merge it: gptlab merge {out} --out DIR" if args.lora else ""))
    return code


def _finetune_common(p: argparse.ArgumentParser, kind: str) -> None:
    from gptlab.config import FINETUNE_DEFAULTS, TrainConfig

    p.add_argument("model", metavar="MODEL",
                   help="the model to start from: a checkpoint or run directory, Hugging Face directory, .gguf file "
                        "or named model (smollm2-135m-instruct)")
    p.add_argument("--out", default=None, metavar="DIR", help=f"run directory (default: runs/{kind}-MODEL, "
                                                              "numbered if taken)")
    p.add_argument("--force", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    FINETUNE_TRAIN_FLAGS[:] = add_config_flags(p.add_argument_group("training"), TrainConfig, FINETUNE_DEFAULTS[kind],
                                               skip=("corpus", "tokenizer", "data"), label=f"finetune {kind}")


def add_finetune(sub: argparse._SubParsersAction) -> None:
    from gptlab.finetune.sft import SFTOptions
    from gptlab.model.lora import LoRAConfig

    p = sub.add_parser("finetune", help="fine-tune a model: instruction SFT, LoRA, classification",
                       description="Fine-tune a model with the same training loop as pretraining.")
    fsub = p.add_subparsers(dest="finetune_command", required=True, metavar="{sft,lora,classify}")
    for kind in ("sft", "lora"):
        lora_text = " Only low-rank adapters train; the base stays frozen." if kind == "lora" else ""
        pk = fsub.add_parser(
            kind, help="instruction fine-tuning on chat data" + (" with LoRA adapters" if kind == "lora" else ""),
            description="Fine-tune on conversations (chat JSONL with 'messages', or Alpaca JSON/JSONL with "
                        "'instruction', 'input', 'output'), rendered with the model's chat template; the loss counts "
                        f"only the assistant's tokens.{lora_text}")
        _finetune_common(pk, kind)
        pk.add_argument("--data", required=True, metavar="FILE", help="training conversations")
        SFT_FLAGS[:] = add_config_flags(pk.add_argument_group("data"), SFTOptions, {}, skip=("lora",))
        g = pk.add_argument_group("LoRA")
        if kind == "sft":
            g.add_argument("--lora", action="store_true", help="train LoRA adapters instead of every weight")
        else:
            pk.set_defaults(lora=True)
        d = LoRAConfig()
        g.add_argument("--lora-rank", type=positive_int, default=d.rank, help=f"adapter rank r (default: {d.rank})")
        g.add_argument("--lora-alpha", type=float, default=d.alpha,
                       help=f"scale: updates are multiplied by alpha / rank (default: {d.alpha:g})")
        g.add_argument("--lora-dropout", type=float, default=d.dropout,
                       help=f"dropout on the adapters' input (default: {d.dropout:g})")
        g.add_argument("--lora-targets", default=",".join(d.targets),
                       help="layers to adapt: comma-separated names (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                            f"up_proj, down_proj) or all-linear (default: {','.join(d.targets)})")
        pk.set_defaults(func=_finetune_sft)
    pc = fsub.add_parser("classify", help="turn a model into a text classifier",
                         description="Replace the LM head with a class head read at the last token and train it on "
                                     "labelled texts (CSV with text,label columns, or JSONL with 'text' and 'label'); "
                                     "prints held-out accuracy and a confusion matrix.")
    _finetune_common(pc, "classify")
    pc.add_argument("--data", required=True, metavar="FILE", help="labelled training texts (.csv or .jsonl)")
    pc.add_argument("--val-data", default=None, metavar="FILE",
                    help="labelled validation texts (default: hold out --val-fraction of --data)")
    pc.add_argument("--val-fraction", type=fraction, default=0.1, help="share held out when --val-data is not "
                                                                         "given (default: 0.1)")
    pc.add_argument("--classes", default=None, help="comma-separated class names, in order (default: the labels "
                                                    "found in --data, sorted)")
    pc.add_argument("--train-last-blocks", type=positive_int, default=None, metavar="N",
                    help="train only the last N blocks, the final norm and the head (default: every weight)")
    pc.set_defaults(func=_finetune_classify)


def _finetune_classify(args: argparse.Namespace) -> int:
    import time

    from gptlab.config import finetune_config
    from gptlab.finetune.classify import run_classify
    from gptlab.train import distributed

    cfg = finetune_config("classify", given(args, FINETUNE_TRAIN_FLAGS))
    with distributed.process_group(cfg.device) as d:  # as _finetune_sft: rank 0 alone claims --out
        out = distributed.decided_by_main(d, partial(_finetune_out, args, "classify"))
        start = time.perf_counter()
        result = run_classify(args.model, args.data, out, cfg, val_data=args.val_data, val_fraction=args.val_fraction,
                              classes=args.classes.split(",") if args.classes else None,
                              train_last_blocks=args.train_last_blocks, show_progress=not args.no_progress, d=d)
    if not d.is_main:
        return 130 if result.run.stopped == "interrupted" else 0
    code = _report_finetune(result.run, time.perf_counter() - start, "classifier")
    print(f"try: gptlab classify {out} --text '...'")
    return code


def _classify(args: argparse.Namespace) -> None:
    from gptlab.finetune.classify import load_classifier, predict

    classifier = load_classifier(args.model)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("nothing to classify; pass --text TEXT (repeatable) or lines on standard input")
    for text, (label, p) in zip(texts, predict(classifier, texts)):
        print(f"{label}\t{p:.3f}\t{text}")


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="label texts with a classifier made by gptlab finetune classify",
                       description="Print the predicted class, its probability and the text, one per line.")
    p.add_argument("model", metavar="MODEL", help="a run or checkpoint made by gptlab finetune classify")
    p.add_argument("--text", action="append", default=None, help="a text to classify (repeatable; default: the "
                                                                   "lines of standard input)")
    p.set_defaults(func=_classify)


def _merge(args: argparse.Namespace) -> None:

    from gptlab.tokenizers.chat_template import checkpoint_chat_config
    from gptlab.weights.checkpoint import CHAT_CONFIG, save_checkpoint
    from gptlab.weights.load import find_adapter, load_adapted

    adapter = find_adapter(Path(args.adapter))
    if adapter is None:
        raise UserError(f"{args.adapter} holds no LoRA adapter (adapter_config.json); give the directory written by "
                        "gptlab finetune lora")
    out = Path(args.out)
    refuse_overwrite(out, args.force)
    merged = load_adapted(adapter)
    chat = checkpoint_chat_config(merged)
    save_checkpoint(out, merged.model, merged.tokenizer, extra_json={CHAT_CONFIG: chat} if chat else None)
    print(f"merged {adapter} into its base model: {out}\ntry: gptlab chat {out}   or: gptlab export {out} --out DIR")


def add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model",
                       description="Fold a LoRA adapter into its base weights (W += B A * alpha / rank) and write an "
                                   "ordinary checkpoint, which exports to Hugging Face format.")
    p.add_argument("adapter", metavar="ADAPTER", help="an adapter directory or a run made by gptlab finetune lora")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged checkpoint")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_merge)
