"""The training loop, checkpoints, resume and the train/sample commands, on tiny models."""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptlab.cli import main
from gptlab.config import DEFAULT_PRESET, TrainConfig, resolve_config
from gptlab.errors import UserError
from gptlab.inference.engine import SamplingParams
from gptlab.inference.run import run_sample
from gptlab.train import loop
from gptlab.train.optim import lr_at
from gptlab.weights import checkpoint as ckpt
from gptlab.weights.load import load_checkpoint

TEXT = "".join(f"{who}: {line}\n" for who, line in [
    ("ROMEO", "But soft, what light through yonder window breaks?"),
    ("JULIET", "O Romeo, Romeo, wherefore art thou Romeo?"),
    ("HAMLET", "To be, or not to be, that is the question."),
    ("MACBETH", "Tomorrow, and tomorrow, and tomorrow."),
]) * 40


@pytest.fixture
def corpus(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT)
    return str(f)


def tiny(corpus: str, **train) -> tuple:
    return resolve_config("tiny", model_overrides={"dropout": 0.1},
                          train_overrides={"corpus": corpus, "eval_interval": 8, **train})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "last" / ckpt.WEIGHTS))


# --- schedule ---------------------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


# --- resume ----------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(corpus, tmp_path, optimizer):
    model_cfg, cfg = tiny(corpus, max_steps=16, optimizer=optimizer)
    loop.train(model_cfg, cfg, tmp_path / "straight", show_progress=False)

    model_cfg, cfg = tiny(corpus, max_steps=16, max_tokens=8 * cfg.batch_size * model_cfg.block_size,
                          optimizer=optimizer)
    first = loop.train(model_cfg, cfg, tmp_path / "split", show_progress=False)
    assert first.step == 8 and first.stopped == "max_tokens"
    model_cfg, cfg = tiny(corpus, max_steps=16, optimizer=optimizer)
    second = loop.train(model_cfg, cfg, tmp_path / "split", resume=loop.read_saved_run(tmp_path / "split"),
                        show_progress=False)
    assert second.step == 16

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The halves wrote one metrics file together.
    steps = [line.split(",")[0] for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps[0] == "5" and steps[-1] == "16"


def test_resume_with_another_model_shape_names_the_fields(corpus, tmp_path):
    model_cfg, cfg = tiny(corpus, max_steps=4)
    loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    code = main(["train", "--resume", str(tmp_path / "run"), "--n-layer", "3", "--n-embd", "64"])
    assert code == 1  # reported, not raised


def test_resume_refusal_message(corpus, tmp_path, capsys):
    model_cfg, cfg = tiny(corpus, max_steps=4)
    loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--n-layer", "3", "--max-steps", "8"]) == 1
    err = capsys.readouterr().err
    assert "n_layer: run has 2, asked for 3" in err and err.count("\n") == 1


# --- stopping ---------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    model_cfg, cfg = tiny(corpus, max_steps=40, log_interval=1)
    calls = {"n": 0}
    original = loop.GPT.forward

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = original(self, idx, targets, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 12:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(loop.GPT, "forward", poisoned)
    with pytest.raises(UserError, match="became nan at step 13"):
        loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    good = weights(tmp_path / "run")
    assert all(torch.isfinite(t).all() for t in good.values())
    _, state = ckpt.load_train_state(tmp_path / "run" / "last")
    assert state["step"] == 8


def test_early_stopping_with_patience(corpus, tmp_path, monkeypatch):
    model_cfg, cfg = tiny(corpus, max_steps=100, eval_interval=2, patience=2)
    # Each evaluation computes the validation loss first, then the training loss.
    val_losses = iter([3.0, 3.0, 2.0, 2.5, 2.6, 2.7, 2.8] * 10)
    calls = iter(range(1000))
    monkeypatch.setattr(loop, "evaluate", lambda *a: next(val_losses) if next(calls) % 2 == 0 else 1.0)
    result = loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    assert result.stopped == "early_stopping" and result.step == 10  # evals at 6 (best), 8, 10
    assert result.best_val_loss == 2.0


def test_stop_by_time(corpus, tmp_path):
    model_cfg, cfg = tiny(corpus, max_steps=100_000, max_time=1.0)
    result = loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    assert result.stopped == "max_time" and 0 < result.step < 100_000
    assert (tmp_path / "run" / "last" / ckpt.TRAIN_STATE).is_file()


def test_out_of_memory_suggests_a_smaller_batch(corpus, tmp_path, monkeypatch):
    model_cfg, cfg = tiny(corpus)

    def oom(self, *a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes")

    monkeypatch.setattr(loop.GPT, "forward", oom)
    with pytest.raises(UserError, match="--batch-size.*--grad-accum"):
        loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)


# --- checkpoints ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # our deliberately hostile file
def test_malicious_train_state_is_refused(corpus, tmp_path):
    model_cfg, cfg = tiny(corpus, max_steps=4)
    loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "run" / "last" / ckpt.TRAIN_STATE).write_bytes(pickle.dumps({"step": Exploit()}))
    with pytest.raises(UserError, match="cannot be loaded safely"):
        ckpt.load_train_state(tmp_path / "run" / "last")
    assert not marker.exists()


def test_corrupt_and_missing_checkpoints(corpus, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    model_cfg, cfg = tiny(corpus, max_steps=4)
    loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    (tmp_path / "run" / "best" / ckpt.WEIGHTS).write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(tmp_path / "run")


def test_tied_head_is_saved_once_and_reloads(corpus, tmp_path):
    model_cfg, cfg = tiny(corpus, max_steps=4)
    loop.train(model_cfg, cfg, tmp_path / "run", show_progress=False)
    assert "lm_head.weight" not in weights(tmp_path / "run")
    loaded = load_checkpoint(tmp_path / "run", prefer="last")
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, weights(tmp_path / "run")["embed_tokens.weight"])


# --- the commands end to end ------------------------------------------------------------------------

def test_cli_train_then_sample(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "tiny", "--corpus", corpus, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--- sample ---" in out and "checkpoint: runs/tiny/best" in out
    for name in ("metrics.csv", "loss.png", "samples.txt", "best/model.safetensors", "last/train_state.pt"):
        assert (tmp_path / "runs" / "tiny" / name).is_file(), name
    assert list((tmp_path / "runs" / "tiny" / "tensorboard").glob("events.out.tfevents.*"))

    # A second run with no --out gets a new directory instead of replacing the first.
    assert main(["train", "--preset", "tiny", "--corpus", corpus, "--no-progress", "--max-steps", "2",
                 "--warmup-steps", "1"]) == 0
    assert (tmp_path / "runs" / "tiny-2" / "best").is_dir()
    capsys.readouterr()

    args = ["sample", "runs/tiny", "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("ROMEO:")
    assert main(args[:-1] + ["8"]) == 0
    assert capsys.readouterr().out != first
    assert main(["sample", "--greedy", "--max-new-tokens", "5", "--num-samples", "2"]) == 0  # newest run
    assert "--- sample 2 ---" in capsys.readouterr().out
    greedy = run_sample(None, prompt="JULIET:", num_samples=2, params=SamplingParams(max_new_tokens=8, temperature=0.0))
    assert greedy[0] == greedy[1] and len(greedy[0]) == len("JULIET:") + 8


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], "--max-steps must be a positive whole number"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--batch-size", "0", "--lr", "0"], "--batch-size must be a positive whole number, got 0; --lr"),
    (["--block-size", "100000"], "fewer than block_size + 1"),
    (["--n-embd", "30", "--n-head", "4"], "--n-embd=30 must be divisible by --n-head=4"),
    (["--config", "missing.json"], "does not exist"),
    (["--target-loss", "-1"], "--target-loss must be a positive number"),
])
def test_bad_training_input_is_one_line(corpus, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--preset", "tiny", "--corpus", corpus, "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "runs" / "tiny" / "last").exists()


def test_unknown_config_key_lists_valid_ones(corpus, tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"model": {"n_layers": 2}, "train": {"learning_rate": 1}}')
    assert main(["train", "--config", str(tmp_path / "c.json")]) == 1
    err = capsys.readouterr().err
    assert "n_layers" in err and "valid keys: vocab_size, block_size, n_layer" in err and "learning_rate" in err


def test_existing_out_needs_force_and_only_runs_are_replaced(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny", "--corpus", corpus, "--no-progress", "--out", str(out)]
    assert main(base + ["--max-steps", "2", "--warmup-steps", "1"]) == 0
    before = (out / "last" / ckpt.WEIGHTS).read_bytes()
    assert main(base) == 1
    assert "--force" in capsys.readouterr().err
    assert (out / "last" / ckpt.WEIGHTS).read_bytes() == before
    assert main(base + ["--force", "--max-steps", "2", "--warmup-steps", "1", "--seed", "5"]) == 0
    assert (out / "last" / ckpt.WEIGHTS).read_bytes() != before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert main(base[:-1] + [str(mine), "--force"]) == 1
    assert "refusing to delete" in capsys.readouterr().err and (mine / "thesis.tex").exists()


def test_sample_without_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample"]) == 1
    assert "no trained model found" in capsys.readouterr().err


def test_ctrl_c_saves_and_resume_continues(corpus, tmp_path):
    """A real SIGINT to a real `gptlab train` process: it stops at a step boundary, saves, and exits 130."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptlab", "train", "--preset", "tiny", "--corpus", corpus, "--out", str(out),
           "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.csv").exists():
        time.sleep(0.2)
    while time.time() < deadline and len((out / "metrics.csv").read_text().splitlines()) < 4:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "resume with: gptlab train --resume" in stderr
    _, state = ckpt.load_train_state(out / "last")
    assert state["step"] >= 3
    assert main(["train", "--resume", str(out), "--max-steps", str(state["step"] + 2), "--no-progress"]) == 0
    _, state2 = ckpt.load_train_state(out / "last")
    assert state2["step"] == state["step"] + 2


def test_resume_into_another_out_branches_the_run(corpus, tmp_path, capsys):
    model_cfg, cfg = tiny(corpus, max_steps=4)
    loop.train(model_cfg, cfg, tmp_path / "a", show_progress=False)
    loop.train(model_cfg, cfg, tmp_path / "b", show_progress=False)
    before = (tmp_path / "b" / "last" / ckpt.WEIGHTS).read_bytes()
    resume = ["train", "--resume", str(tmp_path / "a"), "--max-steps", "6", "--no-progress", "--out"]
    assert main(resume + [str(tmp_path / "b")]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "b" / "last" / ckpt.WEIGHTS).read_bytes() == before
    assert main(resume + [str(tmp_path / "c")]) == 0
    assert ckpt.load_train_state(tmp_path / "c" / "last")[1]["step"] == 6
    assert ckpt.load_train_state(tmp_path / "a" / "last")[1]["step"] == 4  # the original run is untouched


def test_unsupported_dtype_falls_back_with_one_warning(corpus, tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--corpus", corpus, "--no-progress", "--max-steps", "2",
                 "--dtype", "fp16", "--device", "cpu", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1 and "--dtype fp16 on cpu" in warnings[0]
    assert "cpu fp32" in captured.out or "cpu bf16" in captured.out  # what auto picks on this CPU


def test_target_loss_stops_at_the_first_evaluation_that_reaches_it(corpus, tmp_path):
    model_cfg, train_cfg = tiny(corpus, max_steps=40, target_loss=50.0)  # any loss is below 50
    result = loop.train(model_cfg, train_cfg, tmp_path / "run", show_progress=False)
    assert result.stopped == "target_loss" and result.step == train_cfg.eval_interval
    model_cfg, train_cfg = tiny(corpus, max_steps=16, target_loss=0.01)  # out of reach: runs to the end
    assert loop.train(model_cfg, train_cfg, tmp_path / "run2", show_progress=False).stopped == "max_steps"


@pytest.mark.parametrize("preset", ["shakespeare-char", "shakespeare-char-fast"])
def test_speedrun_presets_train_with_their_speedrun_options(preset, corpus, tmp_path):
    model_cfg, train_cfg = resolve_config(preset, train_overrides={
        "corpus": corpus, "max_steps": 4, "warmup_steps": 1, "eval_interval": 2, "eval_batches": 2})
    assert (model_cfg.pos_embedding, model_cfg.norm, model_cfg.mlp, train_cfg.optimizer) == \
        ("rope", "rmsnorm", "relu2", "muon")
    assert model_cfg.qk_norm and model_cfg.zero_init_residual and not model_cfg.tie_embeddings
    result = loop.train(model_cfg, train_cfg, tmp_path / "fast", show_progress=False)
    assert result.step == 4 and result.last_eval["val_loss"] < math.log(model_cfg.vocab_size)


def test_gpt2_recipe_preset_is_the_default_model_in_gpt2_form():
    """The speedrun's baseline: the default's shapes and batch, in the GPT-2 architecture with AdamW."""
    gpt2_model, gpt2_train = resolve_config("shakespeare-char-gpt2")
    model, train = resolve_config(DEFAULT_PRESET)
    assert (gpt2_model.pos_embedding, gpt2_model.norm, gpt2_model.mlp, gpt2_train.optimizer) == \
        ("learned", "layernorm", "gelu", "adamw")
    assert gpt2_model.tie_embeddings and not gpt2_model.qk_norm and not gpt2_model.zero_init_residual
    shape = ("n_layer", "n_head", "n_embd", "block_size")
    assert [getattr(gpt2_model, f) for f in shape] == [getattr(model, f) for f in shape]
    assert (gpt2_train.batch_size, gpt2_train.eval_batches, gpt2_train.corpus) == \
        (train.batch_size, train.eval_batches, train.corpus)
