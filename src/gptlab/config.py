"""Configuration: typed dataclasses, presets, and how they combine.

A run is described by two dataclasses: ``ModelConfig`` (the network's shape, saved with every
checkpoint as ``config.json``) and ``TrainConfig`` (data, optimisation, evaluation, system).
They are filled in this order, each layer overriding the one before:

    dataclass defaults  <  preset (--preset)  <  config file (--config)  <  command-line flags

A preset or config file is a dict ``{"model": {...}, "train": {...}}``. Every problem with the
result (unknown keys, out-of-range values, conflicting options) is reported at once, each one
naming the flag that sets it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.device import DTYPE_CHOICES
from gptlab.errors import Problems, Settings, UserError, flag, is_int, is_number, unknown_keys
from gptlab.model.config import FAMILY_DEFAULTS, ModelConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig(Settings):
    """Everything about a training run except the model's shape."""

    # --- data ---
    corpus: str = "shakespeare-tiny"
    """Corpus to train on when --data is not given (a name, file, folder, glob or URL)."""
    tokenizer: str = "char"
    """Tokenizer used to prepare --corpus: char, bpe:N, gpt2 or a tokenizer file."""
    data: str | None = None
    """A directory made by `gptlab prepare`; takes the place of corpus and tokenizer."""

    # --- optimisation ---
    batch_size: int = 64
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    max_steps: int = 2000
    """Optimizer steps; also the length of the learning-rate schedule."""
    max_tokens: int | None = None
    """Stop once this many training tokens have been seen (the schedule still spans max_steps)."""
    max_time: float | None = None
    """Stop after this many seconds of training (the schedule still spans max_steps)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to weight matrices only."""
    decay_embeddings: bool = False
    """Also apply weight decay to the embedding tables."""
    beta1: float = 0.9
    beta2: float = 0.95
    optimizer: str = "adamw"
    """adamw, or muon: Muon for the matrices inside the blocks and AdamW for the rest."""
    muon_lr: float = 0.02
    """Peak learning rate of the Muon matrices (--lr stays AdamW's); the same schedule scales both."""
    muon_momentum: float = 0.95
    """Muon's (Nesterov) momentum."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 turns clipping off)."""

    # --- evaluation and logging ---
    eval_interval: int = 250
    """Evaluate on train and validation batches every this many steps (and at the end)."""
    eval_batches: int = 20
    """Batches averaged per evaluation."""
    patience: int | None = None
    """Stop early after this many evaluations without a better validation loss."""
    target_loss: float | None = None
    """Stop at the first evaluation whose validation loss is at or below this: a finish line for
    speed runs ("how fast can it reach 1.77?")."""
    log_interval: int = 10
    """Update the progress bar, metrics.csv and TensorBoard every this many steps."""
    sample_interval: int = 0
    """Print a short generated sample every this many steps (0: only at the end)."""
    sample_tokens: int = 200
    """Length of those samples, in tokens."""

    # --- system ---
    device: str = "auto"
    """auto picks cuda, then mps, then cpu."""
    dtype: str = "auto"
    """Compute precision (autocast): auto picks bf16 on a CUDA GPU that has it and fp32 on every CPU, so the
    same run prints the same losses on every machine; fp32; bf16 (about 1.5-2x faster for models of 10M
    parameters and more on CPUs with AVX-512 BF16 or AMX); fp16 (GPUs)."""
    compile: bool = False
    """Compile the model with torch.compile (slower start, faster steps)."""
    fsdp: bool = False
    """Under torchrun, shard parameters, gradients and optimizer state across processes (FSDP2) instead of
    replicating the model (DDP): for models that do not fit one device."""
    seed: int = 1337
    """Seeds weights, batches and dropout; the same seed gives the same run on CPU."""

    WHAT = "training settings"

    def _check(self, p: Problems) -> None:
        p.whole("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval",
                "sample_tokens")
        p.whole("warmup_steps", "sample_interval", minimum=0)
        p.whole("max_tokens", "patience", optional=True)
        p.positive("target_loss", "max_time", optional=True)
        p.positive("lr", "muon_lr")
        p.within("min_lr_ratio", 0.0, 1.0, high_included=True)
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            p.must(is_number(value) and value >= 0, name, "a number >= 0")
        for name in ("beta1", "beta2", "muon_momentum"):
            p.within(name, 0.0, 1.0)
        p.add(not (is_int(self.warmup_steps) and is_int(self.max_steps)) or self.warmup_steps <= self.max_steps,
              f"{p.said('warmup_steps')} cannot exceed {p.said('max_steps')}")
        p.choice("optimizer", OPTIMIZERS)
        p.choice("device", DEVICES)
        p.choice("dtype", DTYPE_CHOICES)


# --- presets -------------------------------------------------------------------------------

# The recipe of the default preset and of the speedrun: the 4-layer, 128-wide character model of
# `shakespeare-char-gpt2` with the changes of the modded-nanoGPT speedruns (RoPE, RMSNorm, QK-norm,
# ReLU^2 MLP, zero-initialised residual projections, an untied head) and Muon for the block
# matrices, AdamW for the rest. Per step it learns far faster than the GPT-2 recipe.
_CHAR_SPEEDRUN_MODEL = {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0, "bias": False,
                        "pos_embedding": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2",
                        "zero_init_residual": True, "tie_embeddings": False}
_CHAR_SPEEDRUN_TRAIN = {"corpus": "shakespeare-tiny", "tokenizer": "char", "batch_size": 8, "optimizer": "muon",
                        "lr": 3e-3, "muon_lr": 0.02, "warmup_steps": 50, "min_lr_ratio": 0.05, "weight_decay": 0.1,
                        "beta2": 0.99, "eval_batches": 40, "log_interval": 25}

# Each preset is a partial config. Shapes for GPT-2 follow the released models; their training
# settings are nanoGPT's OpenWebText recipe scaled for one GPU and are meant for GPU machines.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The default: a character-level model sized to train on a 2-core CPU in under 5 minutes (277 s
    # here), with the speedrun changes. Its 2,250 steps reach 1.639 nats/char on the whole held-out
    # split, where the GPT-2 recipe below ends at 1.758 in about the same time. See
    # benchmarks/RESULTS.md.
    "shakespeare-char": {
        "model": dict(_CHAR_SPEEDRUN_MODEL),
        "train": {**_CHAR_SPEEDRUN_TRAIN, "max_steps": 2250, "eval_interval": 450, "sample_interval": 1350},
    },
    # The same character model in the GPT-2 architecture (learned positions, LayerNorm, GELU, tied
    # head) trained with AdamW: the baseline the speedrun changes are measured against. For this
    # budget (fp32, ~13,700 tokens/s) a small model with small batches and many steps beat wider
    # models and bigger batches.
    "shakespeare-char-gpt2": {
        "model": {"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0, "bias": False},
        "train": {"corpus": "shakespeare-tiny", "tokenizer": "char", "batch_size": 8, "max_steps": 3400,
                  "lr": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.05, "weight_decay": 0.1, "beta2": 0.99,
                  "eval_interval": 850, "eval_batches": 40, "log_interval": 25, "sample_interval": 1700},
    },
    # The first rung of the ladder: a (V, V) table of next-character logits, no context at all.
    # Converges in seconds on a CPU to the corpus's bigram statistics (about 2.5 nats per
    # character on shakespeare-tiny, against ln(76) = 4.33 for a uniform guess over its characters).
    "bigram": {
        "model": {"arch": "bigram", "tie_embeddings": False, "block_size": 64},
        "train": {"corpus": "shakespeare-tiny", "tokenizer": "char", "batch_size": 32, "max_steps": 500,
                  "lr": 0.1, "warmup_steps": 10, "weight_decay": 0.0, "eval_interval": 125, "eval_batches": 20,
                  "log_interval": 25, "sample_tokens": 300},
    },
    # The default's recipe on a short, 900-step schedule: the speedrun. It reaches the GPT-2
    # recipe's final validation loss (1.77 after 3,400 steps) in 900 (schedules of 750 and 1,200
    # steps reached 1.773 and 1.771 after 750 and 900). Each step costs more than a GPT-2 step
    # (Muon's orthogonalisation). Same batch and eval batches as `shakespeare-char-gpt2`, so both
    # validation losses are measured on the same windows; benchmarks/fast_preset.py races the two.
    "shakespeare-char-fast": {
        "model": dict(_CHAR_SPEEDRUN_MODEL),
        "train": {**_CHAR_SPEEDRUN_TRAIN, "max_steps": 900, "eval_interval": 300, "sample_interval": 0},
    },
    # The classic GPU recipe for character-level Shakespeare (nanoGPT's shakespeare_char: 10.7M
    # parameters, 6 layers x 384 wide, context 256, 64 x 256 tokens per step, dropout 0.2 against
    # overfitting a 1 MB corpus), in bf16 and compiled. Minutes on a GPU; far too big for the CPU.
    "shakespeare-char-gpu": {
        "model": {"block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2, "bias": False},
        "train": {"corpus": "shakespeare-tiny", "tokenizer": "char", "batch_size": 64, "max_steps": 5000,
                  "lr": 1e-3, "warmup_steps": 100, "min_lr_ratio": 0.1, "weight_decay": 0.1, "beta2": 0.99,
                  "eval_interval": 250, "eval_batches": 100, "log_interval": 50, "sample_interval": 2500,
                  "dtype": "auto", "compile": True},
    },
    # A small Gemma 3 for the character-level corpus, trained from scratch with the GPT-2 recipe's
    # settings: six layers, five local (a 32-character window) per global one, multi-query attention,
    # heads of 64 (wider than 128 // 4, as Gemma's are), sandwich norms, QK-norm and a GeGLU MLP.
    # Its settings are a first choice, not tuned against the presets above.
    "gemma3-tiny": {
        "model": {**FAMILY_DEFAULTS["gemma3"], "block_size": 128, "n_layer": 6, "n_head": 4, "n_kv_head": 1,
                  "n_embd": 128, "head_dim": 64, "intermediate_size": 512, "sliding_window": 32, "dropout": 0.0},
        "train": {"corpus": "shakespeare-tiny", "tokenizer": "char", "batch_size": 8, "max_steps": 2000,
                  "lr": 3e-3, "warmup_steps": 100, "min_lr_ratio": 0.05, "weight_decay": 0.1, "beta2": 0.99,
                  "eval_interval": 500, "eval_batches": 40, "log_interval": 25, "sample_interval": 1000},
    },
    # For tests and quick looks: trains in seconds, learns nothing much.
    "tiny": {
        "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0},
        "train": {"batch_size": 8, "max_steps": 20, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 10,
                  "eval_batches": 2, "log_interval": 5, "sample_tokens": 32},
    },
}
_GPT2_TRAIN = {"tokenizer": "gpt2", "corpus": "shakespeare", "batch_size": 12, "grad_accum": 40,
               "max_steps": 600_000, "lr": 6e-4, "min_lr_ratio": 0.1, "warmup_steps": 2000, "weight_decay": 0.1,
               "beta2": 0.95, "eval_interval": 2000, "eval_batches": 200, "dtype": "auto", "compile": True}
for _name, (_layers, _heads, _embd) in {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                                        "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}.items():
    PRESETS[_name] = {
        "model": {**FAMILY_DEFAULTS["gpt2"], "vocab_size": 50257, "block_size": 1024, "n_layer": _layers,
                  "n_head": _heads, "n_embd": _embd, "dropout": 0.0},
        "train": dict(_GPT2_TRAIN),
    }
# The other families, trained from scratch with the GPT-2 recipe. Shapes: llama is SmolLM2-135M, qwen2 is
# Qwen2.5-0.5B, mistral a small Mistral (sliding window of half its context), gemma3 is Gemma 3 270M (with a
# 2,048-token context). The batch size keeps GPT-2's ~0.5M tokens per optimizer step; vocab_size is set from
# the data's tokenizer when training from scratch.
for _name, _model in {
    "llama": {"vocab_size": 49152, "block_size": 2048, "n_layer": 30, "n_head": 9, "n_kv_head": 3, "n_embd": 576,
              "intermediate_size": 1536, "rope_theta": 100000.0, "tie_embeddings": True},
    "qwen2": {"vocab_size": 151936, "block_size": 2048, "n_layer": 24, "n_head": 14, "n_kv_head": 2, "n_embd": 896,
              "intermediate_size": 4864, "rope_theta": 1000000.0, "tie_embeddings": True},
    "mistral": {"vocab_size": 32000, "block_size": 1024, "n_layer": 8, "n_head": 8, "n_kv_head": 2, "n_embd": 512,
                "intermediate_size": 1536, "sliding_window": 512, "tie_embeddings": False},
    "gemma3": {"vocab_size": 262144, "block_size": 2048, "n_layer": 18, "n_head": 4, "n_kv_head": 1, "n_embd": 640,
               "head_dim": 256, "intermediate_size": 2048, "sliding_window": 512},
}.items():
    PRESETS[_name] = {
        "model": {**FAMILY_DEFAULTS[_name], "dropout": 0.0, **_model},
        "train": {**_GPT2_TRAIN, "batch_size": 12 * 1024 // _model["block_size"]},
    }
DEFAULT_PRESET = "shakespeare-char"

# Training settings of `gptlab finetune` (flags override them). Fine-tuning starts from weights
# that already work, so it takes small steps (full SFT) or larger ones on the few adapter weights
# (LoRA, whose B starts at zero), with a short warmup and no weight decay pulling them to zero.
FINETUNE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sft": {"batch_size": 8, "max_steps": 300, "lr": 1e-4, "warmup_steps": 10, "min_lr_ratio": 0.1,
            "weight_decay": 0.0, "eval_interval": 50, "eval_batches": 10, "log_interval": 5, "dtype": "auto"},
    "lora": {"batch_size": 8, "max_steps": 300, "lr": 1e-3, "warmup_steps": 10, "min_lr_ratio": 0.1,
             "weight_decay": 0.0, "eval_interval": 50, "eval_batches": 10, "log_interval": 5, "dtype": "auto"},
    "classify": {"batch_size": 8, "max_steps": 300, "lr": 5e-5, "warmup_steps": 10, "min_lr_ratio": 0.1,
                 "weight_decay": 0.1, "eval_interval": 50, "eval_batches": 20, "log_interval": 5, "dtype": "auto"},
}


def finetune_config(kind: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """``FINETUNE_DEFAULTS[kind]`` < ``overrides`` as a validated ``TrainConfig``. A short run
    given only --max-steps gets a warmup of at most a tenth of it."""
    overrides = overrides or {}
    d = {**FINETUNE_DEFAULTS[kind], **overrides}
    if "warmup_steps" not in overrides and isinstance(d["max_steps"], int):
        d["warmup_steps"] = min(d["warmup_steps"], d["max_steps"] // 10)
    cfg = TrainConfig(**d)
    problems = cfg.problems(flag)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a JSON config file of the form {"model": {...}, "train": {...}}."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or set(d) - {"model", "train"}:
        raise UserError(f'config file {path} must be a JSON object with only "model" and "train" sections')
    return d


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   model_overrides: dict[str, Any] | None = None,
                   train_overrides: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """Combine defaults < preset < config file < overrides into validated configs.

    ``vocab_size`` is left at its default here; the caller sets it from the tokenizer.
    """
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    layers = [(f"preset {preset}", PRESETS[preset])] if preset else []
    if config_file is not None:
        layers.append((f"config file {config_file}", load_config_file(config_file)))
    layers.append(("command line", {"model": model_overrides or {}, "train": train_overrides or {}}))

    model_d: dict[str, Any] = {}
    train_d: dict[str, Any] = {}
    problems: list[str] = []
    for where, layer in layers:
        problems += unknown_keys(layer.get("model", {}), ModelConfig, f"{where} [model]")
        problems += unknown_keys(layer.get("train", {}), TrainConfig, f"{where} [train]")
        model_d.update(layer.get("model", {}))
        train_d.update(layer.get("train", {}))
    if problems:
        raise UserError("; ".join(problems))
    model_cfg = ModelConfig(**model_d)
    train_cfg = TrainConfig(**train_d)
    problems = model_cfg.problems(flag) + train_cfg.problems(flag)
    if problems:
        raise UserError("; ".join(problems))
    return model_cfg, train_cfg
