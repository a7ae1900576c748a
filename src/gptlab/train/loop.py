"""The training loop: one loop for pretraining and, later, every kind of fine-tuning.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from gptlab.cache import cache_dir
from gptlab.config import TrainConfig
from gptlab.data.batches import RandomBatches, check_length
from gptlab.data.prepare import PreparedData, load_prepared, prepare
from gptlab.errors import UserError
from gptlab.inference.sampling import generate
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.tokenizers import Tokenizer
from gptlab.train import checkpoint as ckpt
from gptlab.train.metrics import MetricsLogger, plot_loss
from gptlab.train.optim import build_optimizer, lr_at
from gptlab.train.system import autocast, dtype_name, pick_device, pick_dtype


@dataclass
class RunResult:
    run_dir: Path
    step: int
    tokens: int
    #: why the run ended: max_steps, max_tokens, max_time, early_stopping, interrupted
    stopped: str
    best_val_loss: float | None
    last_eval: dict[str, float] = field(default_factory=dict)
    sample: str = ""


def load_data(cfg: TrainConfig) -> PreparedData:
    """The prepared dataset named by ``--data``, or ``--corpus`` + ``--tokenizer`` prepared into the cache."""
    if cfg.data is not None:
        return load_prepared(cfg.data)
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.corpus}-{cfg.tokenizer}")[-100:]
    return prepare(cfg.corpus, cfg.tokenizer, cache_dir() / "prepared" / slug, force=True)


def evaluate(model: torch.nn.Module, data: PreparedData, split: str, cfg: TrainConfig, block_size: int,
             device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over ``eval_batches`` batches drawn with a fixed seed: the same batches at every
    evaluation, so successive values differ only because the model changed."""
    batches = RandomBatches(data.tokens(split), block_size, cfg.batch_size, seed=cfg.seed + (1 if split == "val" else 2))
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y = batches.next()
            with autocast(device, dtype):
                _, loss = model(x.to(device), y.to(device))
            total += loss.float()
    model.train(was_training)
    return (total / cfg.eval_batches).item()


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


def train(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: str | Path, resume: bool = False,
          show_progress: bool = True) -> RunResult:
    """Train (or resume training) into ``run_dir``; see the module docstring."""
    run_dir = Path(run_dir)
    data = load_data(cfg)
    tokenizer = data.tokenizer()
    if resume:
        resume_dir = ckpt.resolve_checkpoint(run_dir, prefer="last")
        saved_model_cfg = ckpt.load_model_config(resume_dir)
        _, state = ckpt.load_train_state(resume_dir)
        model_cfg = saved_model_cfg
        if model_cfg.vocab_size != tokenizer.vocab_size:
            raise UserError(f"the checkpoint's vocabulary ({model_cfg.vocab_size}) differs from the data's "
                            f"({tokenizer.vocab_size}); resume with the data it was trained on")
    else:
        model_cfg.vocab_size = tokenizer.vocab_size
        model_cfg.validate()
    block = model_cfg.block_size
    check_length(data.tokens("train"), block, "train")
    check_length(data.tokens("val"), block, "val")

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    batches = RandomBatches(data.tokens("train"), block, cfg.batch_size, seed=cfg.seed)
    step, tokens_seen, best_val, evals_since_best = 0, 0, math.inf, 0
    if resume:
        ckpt.load_weights(model, resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        _set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens"]
        best_val, evals_since_best = state["best_val"], state["evals_since_best"]
        if step >= cfg.max_steps:
            raise UserError(f"{run_dir} already finished its {cfg.max_steps} steps; pass a larger --max-steps "
                            "to train further")
    run_dir.mkdir(parents=True, exist_ok=True)
    fwd = torch.compile(model) if cfg.compile else model
    tokens_per_step = cfg.batch_size * block * cfg.grad_accum
    bits_per_byte = data.meta["val_tokens"] / data.meta["val_bytes"] / math.log(2)
    metrics = MetricsLogger(run_dir)

    def save_last() -> None:
        train_state = {"optimizer": optimizer.state_dict(), "batches": batches.state_dict(), "rng": _rng_state(),
                       "step": step, "tokens": tokens_seen, "best_val": best_val,
                       "evals_since_best": evals_since_best}
        ckpt.save_checkpoint(run_dir / "last", model, tokenizer, cfg.to_dict(), train_state)

    def run_eval() -> dict[str, float]:
        nonlocal best_val, evals_since_best
        val = evaluate(fwd, data, "val", cfg, block, device, dtype)
        result = {"eval_train_loss": evaluate(fwd, data, "train", cfg, block, device, dtype), "val_loss": val,
                  "val_ppl": math.exp(min(val, 50.0)), "val_bits_per_byte": val * bits_per_byte}
        if val < best_val:
            best_val, evals_since_best = val, 0
            ckpt.save_checkpoint(run_dir / "best", model, tokenizer)
        else:
            evals_since_best += 1
        return result

    tqdm.write(f"training {model.num_parameters():,} parameters ({model_cfg.n_layer} layers, {model_cfg.n_embd} wide) "
               f"on {data.meta['train_tokens']:,} tokens | {device.type} {dtype_name(dtype)} | "
               f"{tokens_per_step:,} tokens/step | run dir {run_dir}")
    start_step, t0 = step, time.perf_counter()
    last_log_t, last_log_step = t0, step
    paused = 0.0  # seconds spent on evaluation and samples since the last log, left out of tokens/s
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    stopped, last_eval = "max_steps", {}
    # In a terminal the bar redraws in place; in a log file every redraw is a new line, so redraw rarely there.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", disable=not show_progress, dynamic_ncols=True,
               mininterval=0.2 if interactive else 30.0)
    fwd.train()
    try:
        with graceful_stop() as stop_requested:
            while step < cfg.max_steps:
                if cfg.max_tokens is not None and tokens_seen >= cfg.max_tokens:
                    stopped = "max_tokens"
                    break
                if cfg.max_time is not None and time.perf_counter() - t0 >= cfg.max_time:
                    stopped = "max_time"
                    break
                if stop_requested.is_set():
                    stopped = "interrupted"
                    break
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                try:
                    for _ in range(cfg.grad_accum):
                        x, y = batches.next()
                        with autocast(device, dtype):
                            _, loss = fwd(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                        (loss / cfg.grad_accum).backward()
                        loss_sum += loss.detach().float()
                        loss_count += 1
                    grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                                 if cfg.grad_clip > 0 else None)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                except RuntimeError as e:
                    if _is_out_of_memory(e):
                        raise UserError(f"a batch of {cfg.batch_size} x {block} tokens does not fit in memory on "
                                        f"{device.type}; use a smaller --batch-size and raise --grad-accum to keep "
                                        "the tokens per step") from None
                    raise
                step += 1
                tokens_seen += tokens_per_step
                bar.update(1)

                is_eval = step % cfg.eval_interval == 0 or step == cfg.max_steps
                if step % cfg.log_interval == 0 or is_eval:
                    train_loss = (loss_sum / max(loss_count, 1)).item()
                    loss_sum.zero_()
                    loss_count = 0
                    if not math.isfinite(train_loss):
                        raise UserError(f"the training loss became {train_loss} at step {step}; stopping. The last "
                                        f"good checkpoint is {run_dir / 'last'}; lower --lr or keep --grad-clip on")
                    now = time.perf_counter()
                    tok_s = (step - last_log_step) * tokens_per_step / max(now - last_log_t - paused, 1e-9)
                    last_log_t, last_log_step, paused = now, step, 0.0
                    row = {"step": step, "tokens": tokens_seen, "elapsed_s": round(now - t0, 3), "lr": lr,
                           "train_loss": train_loss, "tokens_per_s": tok_s,
                           "grad_norm": None if grad_norm is None else grad_norm.item()}
                    if is_eval:
                        last_eval = run_eval()
                        row.update(last_eval)
                        tqdm.write(f"step {step}: train {last_eval['eval_train_loss']:.4f}, val "
                                   f"{last_eval['val_loss']:.4f} (ppl {last_eval['val_ppl']:.2f}, "
                                   f"{last_eval['val_bits_per_byte']:.3f} bits/byte)")
                        save_last()
                        paused += time.perf_counter() - now
                    metrics.log(row)
                    bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    if is_eval and cfg.patience is not None and evals_since_best >= cfg.patience:
                        stopped = "early_stopping"
                        tqdm.write(f"no better validation loss in {cfg.patience} evaluations; stopping early")
                        break
                if cfg.sample_interval and step % cfg.sample_interval == 0:
                    sample_start = time.perf_counter()
                    tqdm.write(f"--- sample at step {step} ---\n"
                               f"{sample_text(model, tokenizer, cfg.sample_tokens, cfg.seed, device)}\n---")
                    paused += time.perf_counter() - sample_start
    finally:
        bar.close()
    try:
        if step > start_step and step % cfg.eval_interval != 0 and step != cfg.max_steps:
            # Stopped between evaluations (tokens, time, Ctrl-C): evaluate and save where we are.
            last_eval = run_eval()
            metrics.log({"step": step, "tokens": tokens_seen, "elapsed_s": round(time.perf_counter() - t0, 3),
                         **last_eval})
            save_last()
        sample = sample_text(model, tokenizer, cfg.sample_tokens, cfg.seed, device)
        with (run_dir / "samples.txt").open("a") as f:
            f.write(f"=== step {step} ===\n{sample}\n\n")
    finally:
        metrics.close()
    plot_loss(run_dir / "metrics.csv", run_dir / "loss.png", title=f"{run_dir.name}: {model.num_parameters():,} parameters")
    return RunResult(run_dir, step, tokens_seen, stopped, None if math.isinf(best_val) else best_val, last_eval, sample)
