"""``gptlab import``, ``gptlab export`` and ``gptlab embed``: open weights in and out."""

from __future__ import annotations

import argparse
from pathlib import Path

from gptlab.cli.args import positive_int, refuse_overwrite
from gptlab.errors import UserError

# --- gptlab import / export -------------------------------------------------------------------

def _import(args: argparse.Namespace) -> None:

    from gptlab.weights.gguf import import_gguf, save_gguf_import
    from gptlab.weights.hf import import_hf, is_hf_dir, save_imported
    from gptlab.weights.load import resolve_model_source

    out = Path(args.out)
    refuse_overwrite(out, args.force)
    src = resolve_model_source(args.src)
    if src.suffix == ".gguf":
        ckpt = import_gguf(src, dtype=args.dtype)
        save_gguf_import(ckpt, out)
    elif is_hf_dir(src):
        ckpt = import_hf(src, dtype=args.dtype)
        save_imported(ckpt, out, src)
    else:
        raise UserError(f"{src} is neither a Hugging Face model directory (config.json with a model_type), "
                        "a .gguf file, nor a named model (smollm2-135m-instruct)")
    print(f"imported {src} ({ckpt.model.num_parameters():,} parameters, {args.dtype}) into {out}")


def _export(args: argparse.Namespace) -> None:

    from gptlab.weights.hf import export_hf
    from gptlab.weights.load import load_checkpoint

    out = Path(args.out)
    refuse_overwrite(out, args.force)
    ckpt = load_checkpoint(args.model)
    export_hf(ckpt, out, family=ckpt.config.arch)
    print(f"exported {ckpt.path} to {out} (Hugging Face {ckpt.config.arch} format)")


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import a Hugging Face model, a GGUF file or a named model",
                       description="Convert a Hugging Face model directory (config.json, safetensors weights, "
                                   "tokenizer.json), hf:ORG/NAME, a .gguf file or a named model "
                                   "(smollm2-135m-instruct) into a gptlab checkpoint directory.")
    p.add_argument("src", help="Hugging Face directory, hf:ORG/NAME, .gguf file or named model")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision of the stored weights (default: fp32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face model directory",
                       description="Write a checkpoint as a directory that transformers' from_pretrained and "
                                   "AutoTokenizer load, with the same logits.")
    p.add_argument("model", help="run directory, checkpoint directory or Hugging Face directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default: hf)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_export)


# --- gptlab embed --------------------------------------------------------------------------

def _embed(args: argparse.Namespace) -> None:
    from gptlab.inference.embed import run_embed

    run_embed(args.model, args.text, batch_size=args.batch_size, normalize=not args.no_normalize, device=args.device)


def add_embed(sub: argparse._SubParsersAction) -> None:
    from gptlab.weights.bert import NAMED_BERTS

    p = sub.add_parser("embed", help="sentence embeddings from a BERT encoder",
                       description="Embed texts with a BERT encoder (mean pooling over the tokens, L2-normalised) "
                                   "and print each vector and, for several texts, their cosine similarities.")
    p.add_argument("model", metavar="MODEL",
                   help=f"a named model ({', '.join(NAMED_BERTS)}) or a Hugging Face BERT directory")
    p.add_argument("--text", action="append", required=True, metavar="TEXT", help="a text to embed (repeatable)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--no-normalize", action="store_true", help="keep the mean-pooled vectors' own length")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.set_defaults(func=_embed)
