"""The training loop: one loop for pretraining and every kind of fine-tuning.

What is trained and how is a ``Job``: the model, its batches, its loss, how to evaluate and how
to save a checkpoint. Pretraining (``pretrain_job``), supervised fine-tuning, LoRA and
classification (``gptlab.finetune``) are jobs; ``run_job`` trains any of them, as a short list of
named steps on a ``Run`` (the state of a run in progress): set up, resume, then one optimizer
step after another with its log row, evaluation and checkpoints, and at the end the last
checkpoint, a sample and the loss curve.

Each optimizer step: set the scheduled learning rate, run ``grad_accum`` micro-batches forward
(under autocast) and backward, clip the global gradient norm, step the optimizer (``--optimizer``:
AdamW, or Muon for the matrices inside the blocks and AdamW for the rest, as the default preset
does; see ``gptlab.train.optim``). Around that: evaluation on fixed train/validation batches, the
best checkpoint by validation loss, the last checkpoint for ``--resume``, metrics, samples and a
progress bar.

Exact resume: everything random has its own saved state (batch sampler generator, torch's
global RNG for dropout, Python's ``random``), evaluation and sampling use their own fresh
generators, and checkpoints are taken only between optimizer steps. So on the CPU, N steps
straight and N/2 + resume + N/2 give bit-identical weights.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from gptlab.cache import cache_dir
from gptlab.config import TrainConfig
from gptlab.data.batches import RandomBatches, check_length
from gptlab.data.prepare import PreparedData, load_prepared, prepare
from gptlab.device import Hardware, autocast, bf16_hint, pick_device, pick_dtype, to_device, use_fast_matmuls
from gptlab.errors import UserError
from gptlab.inference.sampling import generate
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT, build_model
from gptlab.tokenizers import Tokenizer
from gptlab.train import distributed
from gptlab.train.metrics import MetricsLogger, plot_loss
from gptlab.train.optim import build_optimizer, lr_at, set_lr
from gptlab.train.system import CompiledOrEager
from gptlab.weights import checkpoint as ckpt

#: one micro-batch: tensors on the CPU, moved to the device by the loop
Batch = tuple[torch.Tensor, ...]


class Batches(Protocol):
    """An endless, resumable source of training batches."""

    def next(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross entropy of a batch ``(inputs, targets)``; targets of -100 do not count
    (fine-tuning sets them on prompt tokens and padding)."""
    x, y = batch
    return model(x, y)[1]


@dataclass
class Job:
    """What the loop trains and how it checks and saves it; the only thing that differs between
    pretraining and each kind of fine-tuning."""

    #: the module being trained (a GPT, with LoRA layers or a class head when fine-tuning; the
    #: bigram baseline; an encoder-decoder): it needs ``configure_optimizer_groups`` and
    #: ``num_parameters``; parameters with ``requires_grad`` False stay frozen
    model: nn.Module
    train_batches: Batches
    #: "train" or "val" -> the same batches on every call, so evaluations are comparable
    eval_batches: Callable[[str], Iterable[Batch]]
    #: write a checkpoint directory: ``save(path, train_state, weights, folders)``. train_state is None
    #: for best/; weights (a state dict) replaces the model's own when given (FSDP gathers them);
    #: folders ({name: path}) are moved into the checkpoint (FSDP's sharded optimizer state)
    save: Callable[..., None]
    #: a one-line description printed at the start ("fine-tuning ... on 1,234 conversations")
    description: str
    loss: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss
    #: extra validation figures (e.g. accuracy), computed at each evaluation
    eval_metrics: Callable[[nn.Module], dict[str, float]] | None = None
    #: a short generated text for the log, or None for jobs that do not generate
    sample: Callable[[nn.Module], str] | None = None
    #: multiply a loss in nats per token by this to get bits per byte of text (pretraining only)
    bits_per_byte: float | None = None


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    #: why the run ended: max_steps, max_tokens, max_time, early_stopping, target_loss, interrupted
    stopped: str
    best_val_loss: float | None
    last_eval: dict[str, float] = field(default_factory=dict)
    sample: str = ""


# --- pretraining ------------------------------------------------------------------------------

def load_data(cfg: TrainConfig) -> PreparedData:
    """The prepared dataset named by ``--data``, or ``--corpus`` + ``--tokenizer`` prepared into the cache."""
    if cfg.data is not None:
        return load_prepared(cfg.data)
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.corpus}-{cfg.tokenizer}")[-100:]
    return prepare(cfg.corpus, cfg.tokenizer, cache_dir() / "prepared" / slug, force=True)


def sample_text(model: GPT, tokenizer: Tokenizer, n_tokens: int, seed: int, device: torch.device,
                prompt: str = "\n") -> str:
    """A short sample from ``prompt`` with its own generator (does not touch the training RNG)."""
    try:
        start = tokenizer.encode(prompt) or [0]
    except UserError:
        start = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        idx = torch.tensor([start], device=device)
        ids = [int(t[0]) for t in generate(model, idx, n_tokens, temperature=0.8, top_k=200, generator=gen)]
    model.train(was_training)
    return tokenizer.decode(start + ids)


def pretrain_job(model: GPT, data: PreparedData, cfg: TrainConfig) -> Job:
    """Next-token prediction on random windows of a prepared corpus."""
    block = model.config.block_size
    tokenizer = data.tokenizer()
    shards = {split: data.shards(split) for split in ("train", "val")}  # memmaps: nothing is read yet
    check_length(shards["train"], block, "train")
    check_length(shards["val"], block, "val")

    def eval_batches(split: str) -> Iterator[Batch]:
        # A fixed seed per split: the same windows at every evaluation.
        batches = RandomBatches(shards[split], block, cfg.batch_size, seed=cfg.seed + (1 if split == "val" else 2))
        return (batches.next() for _ in range(cfg.eval_batches))

    def save(path: Path, train_state: dict[str, Any] | None, weights=None, folders=None) -> None:
        ckpt.save_checkpoint(path, model, tokenizer, cfg.to_dict() if train_state else None, train_state,
                             state_dict=weights, folders=folders)

    def sample(m: nn.Module) -> str:
        return sample_text(model, tokenizer, cfg.sample_tokens, cfg.seed, model.embed_tokens.weight.device)

    cfg_m = model.config
    shape = "a bigram table" if cfg_m.arch == "bigram" else f"{cfg_m.n_layer} layers, {cfg_m.n_embd} wide"
    global_batch = cfg.batch_size * distributed.world_size()  # every process draws it and keeps its share
    return Job(model, RandomBatches(shards["train"], block, global_batch, seed=cfg.seed), eval_batches, save,
               description=f"training {model.num_parameters():,} parameters ({shape}) on "
                           f"{data.meta['train_tokens']:,} tokens, "
                           f"{global_batch * block * cfg.grad_accum:,} tokens/step",
               sample=sample, bits_per_byte=data.meta["val_tokens"] / data.meta["val_bytes"] / math.log(2))


@dataclass
class SavedRun:
    """A run's last checkpoint, read once to resume it (``read_saved_run``)."""

    path: Path  # the checkpoint directory, RUN/last
    model: ModelConfig
    train: dict[str, Any]  # the TrainConfig it ran with, as a dict
    state: dict[str, Any]  # the train state: optimizer, batch position, RNG states, step, ...


def read_saved_run(run_dir: str | Path) -> SavedRun:
    """The last checkpoint of ``run_dir``: its model config, training settings and train state."""
    path = ckpt.resolve_checkpoint(run_dir, prefer="last")
    model_cfg = ckpt.load_model_config(path)
    train_cfg, state = ckpt.load_train_state(path)
    return SavedRun(path, model_cfg, train_cfg, state)


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, resume: SavedRun | None = None,
          show_progress: bool = True, d: distributed.Dist | None = None) -> RunResult:
    """Pretrain into ``run_dir``, or continue the run ``resume`` (its model config replaces
    ``model_cfg``); ``d`` as in ``run_job``. See the module docstring."""
    main = d is None or d.is_main
    if main:  # one process prepares the data; the others then find it ready
        data = load_data(cfg)
    distributed.barrier()
    if not main:
        data = load_data(cfg)
    tokenizer = data.tokenizer()
    if resume is not None:
        model_cfg = resume.model
        if model_cfg.vocab_size != tokenizer.vocab_size:
            raise UserError(f"the checkpoint's vocabulary ({model_cfg.vocab_size}) differs from the data's "
                            f"({tokenizer.vocab_size}); resume with the data it was trained on")
    else:
        model_cfg.vocab_size = tokenizer.vocab_size
        model_cfg.validate()
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(model_cfg)
    if resume is not None:
        ckpt.load_weights(model, resume.path)
    return run_job(pretrain_job(model, data, cfg), cfg, run_dir, None if resume is None else resume.state,
                   show_progress, d)


# --- the loop ---------------------------------------------------------------------------------

def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
             device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over ``batches`` in eval mode (no dropout, no gradients)."""
    was_training = model.training
    model.eval()
    total, n = torch.zeros((), device=device), 0
    with torch.no_grad():
        for batch in batches:
            with autocast(device, dtype):
                total += loss_fn(model, to_device(batch, device)).float()
            n += 1
    model.train(was_training)
    if n == 0:
        raise UserError("the validation set is empty; give more data or a larger validation fraction")
    return (total / n).item()


@contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C or SIGTERM into a flag the loop checks between steps, so the run
    stops on a step boundary and saves; a second Ctrl-C interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("stopping after this step and saving a checkpoint (press Ctrl-C again to abort)")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def describe_eval(e: dict[str, float]) -> str:
    """An evaluation as the loop prints it: ``train 2.6925, val 2.8309 (ppl 16.96, 4.084 bits/byte)``."""
    extra = [f"ppl {e['val_ppl']:.2f}"]
    if "val_bits_per_byte" in e:
        extra.append(f"{e['val_bits_per_byte']:.3f} bits/byte")
    extra += [f"{k.removeprefix('val_')} {v:.4g}" for k, v in e.items() if k not in
              ("eval_train_loss", "val_loss", "val_ppl", "val_bits_per_byte")]
    return f"train {e['eval_train_loss']:.4f}, val {e['val_loss']:.4f} ({', '.join(extra)})"


class Run:
    """A run in progress: what ``run_job`` sets up once, and the counters its steps move on.

    Each method is one named step of the loop; ``run_job`` calls them in order."""

    def __init__(self, job: Job, cfg: TrainConfig, run_dir: Path, d: distributed.Dist) -> None:
        """Set up: the device and precision, the model on the device (wrapped when there are
        several processes) and its optimizer."""
        distributed.check_same_settings({"train": cfg.to_dict(), "job": job.description}, d)
        self.job, self.cfg, self.run_dir, self.d = job, cfg, run_dir, d
        self.device = distributed.device_for(d, pick_device(cfg.device))
        self.precision = pick_dtype(cfg.dtype, self.device)
        self.dtype = self.precision.dtype
        use_fast_matmuls(self.device)
        random.seed(cfg.seed)
        self.model = job.model.to(self.device)
        self.wrapped = distributed.wrap(self.model, d, cfg.fsdp)  # DDP, FSDP2 (in place) or the model itself
        self.fwd: nn.Module = self.wrapped  # what forward runs on: compiled or not (see start)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.batches = job.train_batches
        self.step, self.tokens, self.best_val, self.evals_since_best = 0, 0, math.inf, 0
        self.last_eval: dict[str, float] = {}
        self.metrics: MetricsLogger | None = None
        # The training loss summed on the device since the last log row: no sync with the host per step.
        self.loss_sum, self.loss_count = torch.zeros((), device=self.device), 0

    def resume(self, state: dict[str, Any]) -> None:
        """Continue a saved run exactly: optimizer, batch position, random generators, counters."""
        cfg = self.cfg
        if cfg.fsdp:
            distributed.load_sharded_optimizer(self.model, self.optimizer, self.run_dir / "last" / distributed.SHARDS)
        elif "optimizer" not in state:
            raise UserError(f"{self.run_dir} was trained with --fsdp; resume it with --fsdp (any number of processes)")
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        _set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.best_val, self.evals_since_best = state["best_val"], state["evals_since_best"]
        if self.step >= cfg.max_steps:
            raise UserError(f"{self.run_dir} already finished its {cfg.max_steps} steps; pass a larger --max-steps "
                            "to train further")

    def start(self, show_progress: bool) -> tqdm:
        """Make the run directory and the metrics log, print the header; start the clock and
        return the progress bar."""
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        if self.cfg.compile:
            self.fwd = CompiledOrEager(self.wrapped)
        self.metrics = MetricsLogger(self.run_dir) if self.d.is_main else None
        procs = f" | {self.d.world} processes ({'FSDP' if self.cfg.fsdp else 'DDP'})" if self.d.active else ""
        self.say(f"{self.job.description} | {self.device.type} {self.precision}{procs} | run dir {self.run_dir}")
        hint = bf16_hint(self.precision, Hardware.of(self.device), sum(p.numel() for p in self.model.parameters()))
        if hint:
            self.say(f"note: {hint}")
        self.start_step, self.t0 = self.step, time.perf_counter()
        self.last_log_t, self.last_log_tokens = self.t0, self.tokens
        self.paused = 0.0  # seconds spent on evaluation and samples since the last log, left out of tokens/s
        # In a terminal the bar redraws in place; in a log file every redraw is a new line, so redraw rarely there.
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, unit="step",
                   disable=not (show_progress and self.d.is_main), dynamic_ncols=True,
                   mininterval=0.2 if sys.stderr.isatty() else 30.0)
        self.fwd.train()
        return bar

    def say(self, text: str) -> None:
        if self.d.is_main:
            tqdm.write(text)

    def stop_reason(self, stop_requested: threading.Event) -> str | None:
        """Why the run stops before its next step, or None to take it."""
        cfg = self.cfg
        if self.step >= cfg.max_steps:
            return "max_steps"
        reason = None
        if cfg.max_tokens is not None and self.tokens >= cfg.max_tokens:
            reason = "max_tokens"
        elif cfg.max_time is not None and time.perf_counter() - self.t0 >= cfg.max_time:
            reason = "max_time"
        elif stop_requested.is_set():
            reason = "interrupted"
        if self.d.active:  # clocks and signals differ between processes: rank 0 decides for all
            reason = distributed.broadcast(reason)
        return reason

    def optimizer_step(self) -> tuple[float, torch.Tensor | None]:
        """One optimizer step at the scheduled learning rate over ``grad_accum`` micro-batches;
        returns the learning rate and the gradient norm before clipping (None without clipping)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        try:
            for micro in range(cfg.grad_accum):
                batch = self.batches.next()
                self.tokens += batch[0].numel()  # the global batch: every process's share
                batch = distributed.shard_batch(batch, self.d)
                # DDP averages gradients across processes once, on the last micro-batch.
                sync = nullcontext() if micro == cfg.grad_accum - 1 or not hasattr(self.wrapped, "no_sync") \
                    else self.wrapped.no_sync()
                with sync:
                    with autocast(self.device, self.dtype):
                        loss = self.job.loss(self.fwd, to_device(batch, self.device))
                    (loss / cfg.grad_accum).backward()
                self.loss_sum += loss.detach().float()
                self.loss_count += 1
            grad_norm = (torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                        cfg.grad_clip)
                         if cfg.grad_clip > 0 else None)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        except RuntimeError as e:
            if _is_out_of_memory(e):
                raise UserError(f"a batch of {cfg.batch_size} sequences does not fit in memory on "
                                f"{self.device.type}; use a smaller --batch-size and raise --grad-accum to keep "
                                "the tokens per step") from None
            raise
        self.step += 1
        return lr, grad_norm

    def evaluates_at(self, step: int) -> bool:
        """Every ``eval_interval`` steps and the last step evaluate (and save)."""
        return step % self.cfg.eval_interval == 0 or step == self.cfg.max_steps

    def train_row(self, lr: float, grad_norm: torch.Tensor | None) -> dict[str, float | None]:
        """The metrics row of this step: the mean training loss since the last row (averaged over
        the processes), the rate in tokens/s; a loss that is no longer finite stops the run."""
        if self.d.active:
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= self.d.world
        train_loss = (self.loss_sum / max(self.loss_count, 1)).item()
        self.loss_sum.zero_()
        self.loss_count = 0
        if not math.isfinite(train_loss):
            raise UserError(f"the training loss became {train_loss} at step {self.step}; stopping. The last "
                            f"good checkpoint is {self.run_dir / 'last'}; lower --lr or keep --grad-clip on")
        now = time.perf_counter()
        tok_s = (self.tokens - self.last_log_tokens) / max(now - self.last_log_t - self.paused, 1e-9)
        self.last_log_t, self.last_log_tokens, self.paused = now, self.tokens, 0.0
        return {"step": self.step, "tokens": self.tokens, "elapsed_s": round(now - self.t0, 3), "lr": lr,
                "train_loss": train_loss, "tokens_per_s": tok_s,
                "grad_norm": None if grad_norm is None else grad_norm.item()}

    def evaluation(self) -> dict[str, float]:
        """Losses (and the job's own figures) on the fixed evaluation batches; a new best
        validation loss is saved to best/."""
        fwd, loss, device, dtype = self.fwd, self.job.loss, self.device, self.dtype
        val = evaluate(fwd, self.job.eval_batches("val"), loss, device, dtype)
        result = {"eval_train_loss": evaluate(fwd, self.job.eval_batches("train"), loss, device, dtype),
                  "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        if self.job.bits_per_byte is not None:
            result["val_bits_per_byte"] = val * self.job.bits_per_byte
        if self.job.eval_metrics is not None:
            was_training = fwd.training
            fwd.eval()
            with torch.no_grad(), autocast(device, dtype):
                result.update(self.job.eval_metrics(fwd))
            fwd.train(was_training)
        if val < self.best_val:
            self.best_val, self.evals_since_best = val, 0
            self.save("best", None)
        else:
            self.evals_since_best += 1
        return result

    def evaluate_and_save(self) -> dict[str, float]:
        """An evaluation step: evaluate and print it, then save last/."""
        self.last_eval = self.evaluation()
        self.say(f"step {self.step}: {describe_eval(self.last_eval)}")
        self.save_last()
        self.paused += time.perf_counter() - self.last_log_t
        return self.last_eval

    def save(self, name: str, train_state: dict[str, Any] | None) -> None:
        """Write run_dir/name from rank 0; with FSDP every rank first hands over its shards."""
        weights = folders = None
        if self.cfg.fsdp:
            weights = distributed.full_weights(self.model)
            if train_state is not None:
                shards = self.run_dir / f".{name}.{distributed.SHARDS}"
                distributed.save_sharded_optimizer(self.model, self.optimizer, shards, self.d)
                folders = {distributed.SHARDS: shards}
        if self.d.is_main:
            self.job.save(self.run_dir / name, train_state, weights, folders)
        distributed.barrier()

    def save_last(self) -> None:
        """Write last/: the weights and everything ``resume`` needs to go on exactly."""
        train_state = {"batches": self.batches.state_dict(), "rng": _rng_state(), "step": self.step,
                       "tokens": self.tokens, "best_val": self.best_val, "evals_since_best": self.evals_since_best}
        if not self.cfg.fsdp:  # FSDP saves it sharded, beside
            train_state["optimizer"] = self.optimizer.state_dict()
        self.save("last", train_state)

    def log(self, row: dict[str, float | None], bar: tqdm) -> None:
        """A row of metrics.csv (and TensorBoard) from rank 0; the latest figures beside the progress bar."""
        if self.metrics is not None:
            self.metrics.log(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:,.0f}")

    def stop_after_eval(self) -> str | None:
        """``--patience`` and ``--target-loss``, checked after each evaluation."""
        cfg = self.cfg
        if cfg.patience is not None and self.evals_since_best >= cfg.patience:
            self.say(f"no better validation loss in {cfg.patience} evaluations; stopping early")
            return "early_stopping"
        if cfg.target_loss is not None and self.last_eval["val_loss"] <= cfg.target_loss:
            self.say(f"validation loss {self.last_eval['val_loss']:.4f} reached --target-loss {cfg.target_loss} "
                     f"at step {self.step}, {time.perf_counter() - self.t0:.1f} s into training; stopping")
            return "target_loss"
        return None

    def show_sample(self) -> None:
        """Every ``sample_interval`` steps, a short generated text in the log."""
        if self.job.sample is None or not self.cfg.sample_interval or self.step % self.cfg.sample_interval:
            return
        sample_start = time.perf_counter()
        text = self.job.sample(self.model)  # on every rank: with FSDP each forward needs them all
        self.say(f"--- sample at step {self.step} ---\n{text}\n---")
        self.paused += time.perf_counter() - sample_start

    def finish(self, stopped: str) -> RunResult:
        """The end of the run: last/ where it stopped, a closing sample, the loss curve."""
        sample = ""
        try:
            if self.step > self.start_step and not self.evaluates_at(self.step):
                if stopped != "interrupted":
                    # Stopped between evaluations (tokens, time): evaluate and save where we are.
                    self.last_eval = self.evaluation()
                    if self.metrics is not None:
                        self.metrics.log({"step": self.step, "tokens": self.tokens,
                                          "elapsed_s": round(time.perf_counter() - self.t0, 3), **self.last_eval})
                # Ctrl-C or SIGTERM saves at once, without evaluating: a SIGTERM is often followed by a SIGKILL
                # after a grace period, and an evaluation would count towards best/ and --patience, so the
                # resumed run would not be the one an uninterrupted run is.
                self.save_last()
            if self.job.sample is not None and stopped != "interrupted":
                sample = self.job.sample(self.model)
                if self.d.is_main:
                    with (self.run_dir / "samples.txt").open("a") as f:
                        f.write(f"=== step {self.step} ===\n{sample}\n\n")
        finally:
            if self.metrics is not None:
                self.metrics.close()
        if self.d.is_main:
            plot_loss(self.run_dir / "metrics.csv", self.run_dir / "loss.png",
                      title=f"{self.run_dir.name}: {self.model.num_parameters():,} parameters")
        best = None if math.isinf(self.best_val) else self.best_val
        return RunResult(self.run_dir, self.step, self.tokens, stopped, best, self.last_eval, sample)


def run_job(job: Job, cfg: TrainConfig, run_dir: str | Path, state: dict[str, Any] | None = None,
            show_progress: bool = True, d: distributed.Dist | None = None) -> RunResult:
    """Train ``job`` into ``run_dir`` under ``cfg``'s optimisation settings; ``state`` (a saved
    train state) continues a run exactly where it stopped.

    ``d`` is the process group its caller joined (``gptlab train`` joins it first, to agree on
    the run directory); without one, the loop itself joins the group when torchrun started the
    process (fine-tuning), and leaves it at the end."""
    with distributed.process_group(cfg.device) if d is None else nullcontext(d) as d:
        run = Run(job, cfg, Path(run_dir), d)
        if state is not None:
            run.resume(state)
        bar = run.start(show_progress)
        try:
            with graceful_stop() as stop_requested:
                while (stopped := run.stop_reason(stop_requested)) is None:
                    lr, grad_norm = run.optimizer_step()
                    bar.update(1)
                    evaluating = run.evaluates_at(run.step)
                    if evaluating or run.step % cfg.log_interval == 0:
                        row = run.train_row(lr, grad_norm)
                        if evaluating:
                            row.update(run.evaluate_and_save())  # best/ if it is the best so far, then last/
                        run.log(row, bar)
                        if evaluating and (stopped := run.stop_after_eval()) is not None:
                            break
                    run.show_sample()
        finally:
            bar.close()
        return run.finish(stopped)
