"""LoRA: fine-tune a frozen model through small low-rank adapters (Hu et al., 2021).

A chosen Linear layer ``y = W x + b`` with W of shape (out, in) becomes

    y = W x + b + (alpha / r) * B (A dropout(x))      A: (r, in), B: (out, r), r << in, out

W and b stay frozen; only A and B train, r * (in + out) numbers instead of out * in. B starts
at zero, so the adapted model starts as exactly the base model; A starts kaiming-uniform as in
the paper's code and PEFT, so that B's first gradients (which are proportional to A x) are
not zero. Dividing by r means that changing the rank does not change how big the update is
for a given alpha, so a learning rate found at one rank carries over to another.

The API, in the order a fine-tuning run uses it:

- ``LoRAConfig(rank, alpha, dropout, targets)``: what to adapt; ``targets`` takes
  ``"q_proj,v_proj"`` or ``"all-linear"`` (every Linear inside the blocks, never ``lm_head``).
- ``add_lora(model, cfg)``: turns the targeted layers into ``LoRALinear`` in place and freezes
  everything else. Base parameter names do not change, so a base checkpoint still loads into
  the model, and the usual optimizer groups pick up only the adapters.
- ``save_adapter(dir, model, cfg, base_model)`` / ``load_adapter(dir)`` /
  ``apply_adapter(model, dir)`` (in ``gptlab.weights.adapter``, with the other file formats):
  an adapter directory holds ``adapter_model.safetensors`` (only the A and B tensors, a few MB)
  and ``adapter_config.json`` (the config, the base model it was trained on and a fingerprint
  of that base's weights, checked before applying).
- ``merge_lora(model)``: folds each adapter into its weight, W += (alpha / r) B A, leaving an
  ordinary GPT that saves, exports and runs at the base model's speed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import Problems, Settings, UserError
from gptlab.model.transformer import GPT

ALL_LINEAR = "all-linear"
# The Linear layers inside a block (gate_proj only with the SwiGLU MLP). lm_head is not among
# them: it is often the embedding matrix itself (tied), which LoRA would then change too.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_PARAMS = ("lora_A", "lora_B")
def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``; names are checked by ``LoRAConfig``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass
class LoRAConfig(Settings):
    """Which layers get adapters, and their shape; ``validate`` checks it (``UserError``)."""

    rank: int = 8
    """r: the inner width of each adapter. 4-16 is typical; higher trains more parameters."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank; alpha = 2 * rank is a common choice."""
    dropout: float = 0.05
    """Dropout on the adapter's input (training mode only); the base path has none of its own."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Names of the block Linears to adapt (the paper's choice is q_proj and v_proj), or
    ``("all-linear",)``. A comma-separated string such as ``"q_proj,v_proj"`` is accepted."""

    WHAT = "LoRA config"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = parse_targets(self.targets)
        elif isinstance(self.targets, list):  # as read back from JSON
            self.targets = tuple(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def _check(self, p: Problems) -> None:
        p.whole("rank")
        p.positive("alpha")
        p.within("dropout", 0.0, 1.0)
        targets = self.targets if isinstance(self.targets, tuple) else (self.targets,)
        bad = [t for t in targets if t not in (*BLOCK_LINEARS, ALL_LINEAR)]
        p.add(not bad and bool(targets), f"{p.spell('targets')}: {', '.join(map(repr, bad)) if bad else 'none'} not "
                                          f"valid; choose from {', '.join(BLOCK_LINEARS)} (comma-separated) or {ALL_LINEAR}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


def lora_flag(name: str) -> str:
    """A LoRA setting as ``gptlab finetune`` spells it: ``rank`` -> ``--lora-rank``."""
    return "--lora-" + name


class LoRALinear(nn.Linear):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (alpha / r) * B A.

    It *is* an ``nn.Linear`` whose ``weight`` and ``bias`` are the base layer's own Parameters
    (not copies), so every name the base had is still there; it adds ``lora_A`` (r, in) and
    ``lora_B`` (out, r).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        # On the meta device nn.Linear allocates nothing; its weight is replaced just below.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **like))
        self.lora_dropout = nn.Dropout(dropout)
        self.train(base.training)  # a new module starts in training mode; follow the model's
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform (nn.Linear's own rule, as PEFT does); B: zero, so B A = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., r) -> (..., out): two thin matmuls; B A (out, in) is never formed.
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W + (alpha / r) B A, sharing this layer's Parameters."""
        delta = self.lora_B.float() @ self.lora_A.float() * self.scaling  # (out, in), in fp32
        self.weight += delta.to(self.weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _block_linears(model: GPT) -> dict[str, nn.Linear]:
    """Every Linear inside the blocks, by full name (``layers.0.self_attn.q_proj``)."""
    return {f"layers.{i}.{name}": m for i, block in enumerate(model.layers)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def _is_lora(name: str) -> bool:
    return name.rpartition(".")[2] in LORA_PARAMS


def add_lora(model: GPT, cfg: LoRAConfig) -> list[str]:
    """Give the targeted layers adapters (in place), freeze all else; return the adapted names.

    Afterwards only ``lora_A``/``lora_B`` require grad, so
    ``model.configure_optimizer_groups`` (which skips frozen parameters) hands the optimizer
    the adapters alone.
    """
    cfg.validate()
    linears = _block_linears(model)
    if any(isinstance(m, LoRALinear) for m in linears.values()):
        raise UserError("the model already has LoRA adapters; merge them into the weights before adding new ones")
    present = [n for n in BLOCK_LINEARS if any(name.endswith("." + n) for name in linears)]
    wanted = present if ALL_LINEAR in cfg.targets else cfg.targets
    missing = [t for t in wanted if t not in present]
    if missing:
        raise UserError(f"LoRA target(s) {', '.join(missing)} match no layer of this {model.config.arch} model; "
                        f"its layers are {', '.join(present)} (or {ALL_LINEAR})")
    model.requires_grad_(False)
    chosen = [name for name in linears if name.rpartition(".")[2] in wanted]
    for name in chosen:
        _replace(model, name, LoRALinear(linears[name], cfg.rank, cfg.alpha, cfg.dropout))
    return chosen


def merge_lora(model: GPT) -> list[str]:
    """Fold every adapter into its base weight and make the layers plain ``nn.Linear`` again.

    The result is an ordinary GPT (the base's state-dict names and nothing else) with every
    parameter trainable, ready for ``save_checkpoint`` or export. Returns the merged names.
    """
    merged = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in merged:
        _replace(model, name, model.get_submodule(name).to_linear())
    model.requires_grad_(True)
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``layers.N....lora_A``/``lora_B``); empty without LoRA."""
    return {k: v for k, v in model.state_dict().items() if _is_lora(k)}


class TrainStats(NamedTuple):
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(1, self.total)
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({share:.2f}%)"


def train_stats(model: nn.Module) -> TrainStats:
    """Trainable and total parameter counts (a tied head counted once), for a banner."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return TrainStats(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
