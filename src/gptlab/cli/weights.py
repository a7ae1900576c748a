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
    from gptlab.weights.load import (
        load_checkpoint,
        load_tokenizer_spec,
        resolve_model_source,
        with_tokenizer,
    )

    out = Path(args.out)
    refuse_overwrite(out, args.force)
    src = resolve_model_source(args.src)
    tokenizer = None if args.tokenizer is None else load_tokenizer_spec(args.tokenizer)
    if src.suffix == ".gguf":
        if tokenizer is not None:
            raise UserError(f"{src} carries its own tokenizer; --tokenizer is for Hugging Face directories and gptlab "
                            "checkpoints")
        ckpt = import_gguf(src, dtype=args.dtype)
        save_gguf_import(ckpt, out)
    elif is_hf_dir(src):
        ckpt = import_hf(src, dtype=args.dtype, tokenizer=tokenizer)
        save_imported(ckpt, out, src)
    elif tokenizer is not None and src.is_dir():  # a gptlab checkpoint, given a (new) tokenizer
        ckpt = with_tokenizer(load_checkpoint(src), tokenizer, args.dtype)
        save_imported(ckpt, out, Path(ckpt.path))
    else:
        raise UserError(f"{src} is neither a Hugging Face model directory (config.json with a model_type), "
                        "a .gguf file, nor a named model (smollm2-135m-instruct); a gptlab checkpoint is imported "
                        "only to give it a tokenizer (--tokenizer)")
    print(f"imported {src} ({ckpt.model.num_parameters():,} parameters, {args.dtype}) into {out}")


def _export(args: argparse.Namespace) -> None:

    from gptlab.weights.gguf_export import check_target, export_gguf
    from gptlab.weights.hf import export_hf
    from gptlab.weights.load import load_checkpoint

    out = Path(args.out)
    refuse_overwrite(out, args.force)
    if args.format == "gguf":
        check_target(out, args.type)
    elif args.type != "f32":
        raise UserError("--type chooses how a GGUF file stores its weights; --format hf writes them as they are")
    ckpt = load_checkpoint(args.model)
    if args.format == "gguf":
        export_gguf(ckpt, out, args.type)
        print(f"exported {ckpt.path} to {out} (GGUF, {args.type.lower()})")
    else:
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
    p.add_argument("--tokenizer", metavar="TOKENIZER", default=None,
                   help="the tokenizer to use: a tokenizer.json file, gpt2, or a model or checkpoint whose tokenizer "
                        "it takes; for weights that come without one (default: the source's own). A gptlab "
                        "checkpoint as SRC gets this tokenizer in place of its own")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_import)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model as a Hugging Face directory or a GGUF file",
                       description="Write a model as a directory that transformers' from_pretrained and AutoTokenizer "
                                   "load (--format hf), or as one GGUF file that llama.cpp runs (--format gguf; gpt2, "
                                   "llama, qwen2 and mistral models), with the same logits and its chat template.")
    p.add_argument("model", help="run directory, checkpoint directory, Hugging Face directory, .gguf file or named "
                                 "model")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="output format (default: hf)")
    p.add_argument("--out", required=True, help="directory to write (hf) or file ending in .gguf (gguf)")
    p.add_argument("--type", default="f32", metavar="TYPE",
                   help="--format gguf: how weight matrices are stored: f32 (exact), f16, q8_0 (8 bits per weight "
                        "plus a scale per 32; a quarter of f32's size) or q4_1 (4 bits plus a scale and a minimum "
                        "per 32; a sixth); norms and biases stay f32 (default: f32)")
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
