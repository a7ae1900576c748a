"""The training loop: one loop for pretraining and every kind of fine-tuning.

What is trained and how is a ``Job``: the model, its batches, its loss, how to evaluate and how
to save a checkpoint. Pretraining (``pretrain_job``), supervised fine-tuning, LoRA and
classification (``gptlab.finetune``) are jobs; ``run_job`` trains any of them.

Each optimizer step: set the scheduled learning rate, run ``grad_accum`` micro-batches forward
(under autocast) and backward, clip the global gradient norm, step AdamW. Around that:
evaluation on fixed train/validation batches, the best checkpoint by validation loss, the
last checkpoint for ``--resume``, metrics, samples and a progress bar.

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
    check_length(data.tokens("train"), block, "train")
    check_length(data.tokens("val"), block, "val")

    def eval_batches(split: str) -> Iterator[Batch]:
        # A fixed seed per split: the same windows at every evaluation.
        batches = RandomBatches(data.tokens(split), block, cfg.batch_size, seed=cfg.seed + (1 if split == "val" else 2))
        return (batches.next() for _ in range(cfg.eval_batches))

    def save(path: Path, train_state: dict[str, Any] | None, weights=None, folders=None) -> None:
        ckpt.save_checkpoint(path, model, tokenizer, cfg.to_dict() if train_state else None, train_state,
                             state_dict=weights, folders=folders)

    def sample(m: nn.Module) -> str:
        return sample_text(model, tokenizer, cfg.sample_tokens, cfg.seed, model.embed_tokens.weight.device)

    cfg_m = model.config
    shape = "a bigram table" if cfg_m.arch == "bigram" else f"{cfg_m.n_layer} layers, {cfg_m.n_embd} wide"
    global_batch = cfg.batch_size * distributed.world_size()  # every process draws it and keeps its share
    return Job(model, RandomBatches(data.tokens("train"), block, global_batch, seed=cfg.seed), eval_batches, save,
               description=f"training {model.num_parameters():,} parameters ({shape}) on "
                           f"{data.meta['train_tokens']:,} tokens, "
                           f"{global_batch * block * cfg.grad_accum:,} tokens/step",
               sample=sample, bits_per_byte=data.meta["val_tokens"] / data.meta["val_bytes"] / math.log(2))


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          show_progress: bool = True) -> RunResult:
    """Pretrain (or resume pretraining) into ``run_dir``; see the module docstring."""
    run_dir = Path(run_dir)
    d = distributed.setup(cfg.device)
    if d.is_main:  # one process prepares the data; the others then find it ready
        data = load_data(cfg)
    distributed.barrier()
    if not d.is_main:
        data = load_data(cfg)
    tokenizer = data.tokenizer()
    state = None
    if resume:
        resume_dir = ckpt.resolve_checkpoint(run_dir, prefer="last")
        model_cfg = ckpt.load_model_config(resume_dir)
        _, state = ckpt.load_train_state(resume_dir)
        if model_cfg.vocab_size != tokenizer.vocab_size:
            raise UserError(f"the checkpoint's vocabulary ({model_cfg.vocab_size}) differs from the data's "
                            f"({tokenizer.vocab_size}); resume with the data it was trained on")
    else:
        model_cfg.vocab_size = tokenizer.vocab_size
        model_cfg.validate()
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_model(model_cfg)
    if resume:
        ckpt.load_weights(model, resume_dir)
    return run_job(pretrain_job(model, data, cfg), cfg, run_dir, state, show_progress)


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


def run_job(job: Job, cfg: TrainConfig, run_dir: str | Path, state: dict[str, Any] | None = None,
            show_progress: bool = True) -> RunResult:
    """Train ``job`` into ``run_dir`` under ``cfg``'s optimisation settings; ``state`` (a saved
    train state) continues a run exactly where it stopped."""
    run_dir = Path(run_dir)
    d = distributed.setup(cfg.device)
    distributed.check_same_settings({"train": cfg.to_dict(), "job": job.description}, d)
    device = distributed.device_for(d, pick_device(cfg.device))
    precision = pick_dtype(cfg.dtype, device)
    dtype = precision.dtype
    use_fast_matmuls(device)
    random.seed(cfg.seed)
    model = job.model.to(device)
    wrapped = distributed.wrap(model, d, cfg.fsdp)  # DDP, FSDP2 (in place) or the model itself
    optimizer = build_optimizer(model, cfg, device)
    batches = job.train_batches
    step, tokens_seen, best_val, evals_since_best = 0, 0, math.inf, 0
    if state is not None:
        if cfg.fsdp:
            distributed.load_sharded_optimizer(model, optimizer, run_dir / "last" / distributed.SHARDS)
        elif "optimizer" not in state:
            raise UserError(f"{run_dir} was trained with --fsdp; resume it with --fsdp (any number of processes)")
        else:
            optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        _set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens"]
        best_val, evals_since_best = state["best_val"], state["evals_since_best"]
        if step >= cfg.max_steps:
            raise UserError(f"{run_dir} already finished its {cfg.max_steps} steps; pass a larger --max-steps "
                            "to train further")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    fwd = CompiledOrEager(wrapped) if cfg.compile else wrapped
    metrics = MetricsLogger(run_dir) if d.is_main else None

    def say(text: str) -> None:
        if d.is_main:
            tqdm.write(text)

    def save(name: str, train_state: dict[str, Any] | None) -> None:
        """Write run_dir/name from rank 0; with FSDP every rank first hands over its shards."""
        weights = folders = None
        if cfg.fsdp:
            weights = distributed.full_weights(model)
            if train_state is not None:
                shards = run_dir / f".{name}.{distributed.SHARDS}"
                distributed.save_sharded_optimizer(model, optimizer, shards, d)
                folders = {distributed.SHARDS: shards}
        if d.is_main:
            job.save(run_dir / name, train_state, weights, folders)
        distributed.barrier()

    def save_last() -> None:
        train_state = {"batches": batches.state_dict(), "rng": _rng_state(), "step": step, "tokens": tokens_seen,
                       "best_val": best_val, "evals_since_best": evals_since_best}
        if not cfg.fsdp:  # FSDP saves it sharded, beside
            train_state["optimizer"] = optimizer.state_dict()
        save("last", train_state)

    def run_eval() -> dict[str, float]:
        nonlocal best_val, evals_since_best
        val = evaluate(fwd, job.eval_batches("val"), job.loss, device, dtype)
        result = {"eval_train_loss": evaluate(fwd, job.eval_batches("train"), job.loss, device, dtype),
                  "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        if job.bits_per_byte is not None:
            result["val_bits_per_byte"] = val * job.bits_per_byte
        if job.eval_metrics is not None:
            was_training = fwd.training
            fwd.eval()
            with torch.no_grad(), autocast(device, dtype):
                result.update(job.eval_metrics(fwd))
            fwd.train(was_training)
        if val < best_val:
            best_val, evals_since_best = val, 0
            save("best", None)
        else:
            evals_since_best += 1
        return result

    def describe_eval(e: dict[str, float]) -> str:
        extra = [f"ppl {e['val_ppl']:.2f}"]
        if "val_bits_per_byte" in e:
            extra.append(f"{e['val_bits_per_byte']:.3f} bits/byte")
        extra += [f"{k.removeprefix('val_')} {v:.4g}" for k, v in e.items() if k not in
                  ("eval_train_loss", "val_loss", "val_ppl", "val_bits_per_byte")]
        return f"train {e['eval_train_loss']:.4f}, val {e['val_loss']:.4f} ({', '.join(extra)})"

    procs = f" | {d.world} processes ({'FSDP' if cfg.fsdp else 'DDP'})" if d.active else ""
    say(f"{job.description} | {device.type} {precision}{procs} | run dir {run_dir}")
    hint = bf16_hint(precision, Hardware.of(device), sum(p.numel() for p in model.parameters()))
    if hint:
        say(f"note: {hint}")
    start_step, t0 = step, time.perf_counter()
    last_log_t, last_log_tokens = t0, tokens_seen
    paused = 0.0  # seconds spent on evaluation and samples since the last log, left out of tokens/s
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    stopped, last_eval = "max_steps", {}
    # In a terminal the bar redraws in place; in a log file every redraw is a new line, so redraw rarely there.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not (show_progress and d.is_main),
               dynamic_ncols=True,
               mininterval=0.2 if interactive else 30.0)
    fwd.train()
    try:
        with graceful_stop() as stop_requested:
            while step < cfg.max_steps:
                reason = None
                if cfg.max_tokens is not None and tokens_seen >= cfg.max_tokens:
                    reason = "max_tokens"
                elif cfg.max_time is not None and time.perf_counter() - t0 >= cfg.max_time:
                    reason = "max_time"
                elif stop_requested.is_set():
                    reason = "interrupted"
                if d.active:  # clocks and signals differ between processes: rank 0 decides for all
                    reason = distributed.broadcast(reason)
                if reason is not None:
                    stopped = reason
                    break
                lr = lr_at(step, cfg)
                set_lr(optimizer, lr)
                try:
                    for micro in range(cfg.grad_accum):
                        batch = batches.next()
                        tokens_seen += batch[0].numel()  # the global batch: every process's share
                        batch = distributed.shard_batch(batch, d)
                        # DDP averages gradients across processes once, on the last micro-batch.
                        sync = nullcontext() if micro == cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync") \
                            else wrapped.no_sync()
                        with sync:
                            with autocast(device, dtype):
                                loss = job.loss(fwd, to_device(batch, device))
                            (loss / cfg.grad_accum).backward()
                        loss_sum += loss.detach().float()
                        loss_count += 1
                    grad_norm = (torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                                cfg.grad_clip)
                                 if cfg.grad_clip > 0 else None)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                except RuntimeError as e:
                    if _is_out_of_memory(e):
                        raise UserError(f"a batch of {cfg.batch_size} sequences does not fit in memory on "
                                        f"{device.type}; use a smaller --batch-size and raise --grad-accum to keep "
                                        "the tokens per step") from None
                    raise
                step += 1
                bar.update(1)

                is_eval = step % cfg.eval_interval == 0 or step == cfg.max_steps
                if step % cfg.log_interval == 0 or is_eval:
                    if d.active:
                        torch.distributed.all_reduce(loss_sum)
                        loss_sum /= d.world
                    train_loss = (loss_sum / max(loss_count, 1)).item()
                    loss_sum.zero_()
                    loss_count = 0
                    if not math.isfinite(train_loss):
                        raise UserError(f"the training loss became {train_loss} at step {step}; stopping. The last "
                                        f"good checkpoint is {run_dir / 'last'}; lower --lr or keep --grad-clip on")
                    now = time.perf_counter()
                    tok_s = (tokens_seen - last_log_tokens) / max(now - last_log_t - paused, 1e-9)
                    last_log_t, last_log_tokens, paused = now, tokens_seen, 0.0
                    row = {"step": step, "tokens": tokens_seen, "elapsed_s": round(now - t0, 3), "lr": lr,
                           "train_loss": train_loss, "tokens_per_s": tok_s,
                           "grad_norm": None if grad_norm is None else grad_norm.item()}
                    if is_eval:
                        last_eval = run_eval()
                        row.update(last_eval)
                        say(f"step {step}: {describe_eval(last_eval)}")
                        save_last()
                        paused += time.perf_counter() - now
                    if metrics is not None:
                        metrics.log(row)
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    if is_eval and cfg.patience is not None and evals_since_best >= cfg.patience:
                        stopped = "early_stopping"
                        say(f"no better validation loss in {cfg.patience} evaluations; stopping early")
                        break
                    if is_eval and cfg.target_loss is not None and last_eval["val_loss"] <= cfg.target_loss:
                        stopped = "target_loss"
                        say(f"validation loss {last_eval['val_loss']:.4f} reached --target-loss {cfg.target_loss} "
                            f"at step {step}, {time.perf_counter() - t0:.1f} s into training; stopping")
                        break
                if job.sample is not None and cfg.sample_interval and step % cfg.sample_interval == 0:
                    sample_start = time.perf_counter()
                    text = job.sample(model)  # on every rank: with FSDP each forward needs them all
                    say(f"--- sample at step {step} ---\n{text}\n---")
                    paused += time.perf_counter() - sample_start
    finally:
        bar.close()
    sample = ""
    try:
        if step > start_step and step % cfg.eval_interval != 0 and step != cfg.max_steps:
            if stopped != "interrupted":
                # Stopped between evaluations (tokens, time): evaluate and save where we are.
                last_eval = run_eval()
                if metrics is not None:
                    metrics.log({"step": step, "tokens": tokens_seen,
                                 "elapsed_s": round(time.perf_counter() - t0, 3), **last_eval})
            # Ctrl-C or SIGTERM saves at once, without evaluating: a SIGTERM is often followed by a SIGKILL
            # after a grace period, and an evaluation would count towards best/ and --patience, so the
            # resumed run would not be the one an uninterrupted run is.
            save_last()
        if job.sample is not None and stopped != "interrupted":
            sample = job.sample(model)
            if d.is_main:
                with (run_dir / "samples.txt").open("a") as f:
                    f.write(f"=== step {step} ===\n{sample}\n\n")
    finally:
        if metrics is not None:
            metrics.close()
    if d.is_main:
        plot_loss(run_dir / "metrics.csv", run_dir / "loss.png",
                  title=f"{run_dir.name}: {model.num_parameters():,} parameters")
    return RunResult(run_dir, step, tokens_seen, stopped, None if math.isinf(best_val) else best_val, last_eval, sample)
