"""Crashes: a training run killed with SIGKILL at random moments, a run stopped by SIGTERM, and
writes of shards and exports cut off midway.

The contract: after any kill, ``gptlab train --resume`` starts from the last complete checkpoint,
and on the CPU the run ends with weights identical to a run never interrupted; no interrupted
write leaves a file that loads as valid but wrong (the destination is the previous complete
version, or absent).

Every run is ``python -m gptlab ARGV`` writing its main thread's stack on SIGUSR1 (``BOOT``), so
the test can sample where a process is (step, evaluation, checkpoint write) and send SIGKILL in
the phase it aims at. By default the runs are forked from a server process that
has already imported gptlab and torch (``multiprocessing``'s forkserver), since a fresh
interpreter per run would spend most of the test importing torch; the slow variants start a
fresh interpreter for every run, and must end exactly where the forked reference run does.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from test_train import TEXT  # the training tests' corpus
from tqdm import tqdm

from gptlab.data import prepare as prepare_module
from gptlab.data.prepare import load_prepared, prepare
from gptlab.errors import UserError
from gptlab.model.config import ModelConfig
from gptlab.model.lora import LoRAConfig, add_lora
from gptlab.model.transformer import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.weights import adapter as adapter_module
from gptlab.weights import checkpoint as ckpt
from gptlab.weights import hf as hf_module
from gptlab.weights.adapter import load_adapter, save_adapter
from gptlab.weights.hf import export_hf
from gptlab.weights.load import load_checkpoint

EVERY = 4  # steps between evaluations, each followed by a checkpoint
STEPS = 64
TEXT_FILE = "c.txt"
SHARDED = "sharded"  # TEXT_FILE prepared into shards of SHARD_TOKENS ids: 4 for training, 1 for validation
SHARD_TOKENS = 2000
TRAIN = ["train", "--preset", "tiny", "--corpus", TEXT_FILE, "--max-steps", str(STEPS), "--eval-interval", str(EVERY),
         "--eval-batches", "12", "--log-interval", "1", "--dropout", "0.1", "--sample-tokens", "8", "--device", "cpu",
         "--no-progress"]
#: the same run reading the sharded dataset
TRAIN_SHARDED = [SHARDED if a == TEXT_FILE else "--data" if a == "--corpus" else a for a in TRAIN]
KILLS = {"file": 10, "shards": 4}
PHASES = ("step", "evaluation", "best/ write", "last/ write")


# --- launching and killing runs -------------------------------------------------------------------

#: ``python -m gptlab ARGV`` appending a line to DUMPS on SIGUSR1: the function names on the main
#: thread's stack; run as ``python -c BOOT DUMPS ARGV...``. DUMPS appears once SIGUSR1 no longer
#: kills the process. A Python signal handler always runs in the main thread, between bytecodes;
#: faulthandler, used before, dumps from whichever thread the kernel picks, and reading the main
#: thread's frames while it runs sometimes crashed the process.
#: Writing a checkpoint's weights and each evaluation are made 20 ms slower, and each training
#: step 5 ms: for this tiny model they take about a millisecond, too short for the test to land a
#: kill in them reliably (the sleep in a step sits in gradient clipping, in Run.optimizer_step under run_job).
#: (The stand-in for ``evaluate`` keeps its name, so a stack sampled in it still reads "evaluation".)
BOOT = """import os, runpy, signal, sys, time, traceback
import torch
import gptlab.weights.checkpoint as checkpoint
import gptlab.train.loop as loop
dumps = sys.argv.pop(1)
out = open(dumps + ".part", "w", buffering=1)
def sample(signum, frame):
    out.write(" ".join(f.f_code.co_name for f, _ in traceback.walk_stack(frame)) + "\\n")
signal.signal(signal.SIGUSR1, sample)
os.rename(dumps + ".part", dumps)
def slow_save_file(*args, _save=checkpoint.save_file, **kwargs):
    time.sleep(0.02)
    return _save(*args, **kwargs)
def evaluate(*args, _evaluate=loop.evaluate, **kwargs):
    time.sleep(0.02)
    return _evaluate(*args, **kwargs)
def clip_grad_norm_(*args, _clip=torch.nn.utils.clip_grad_norm_, **kwargs):
    time.sleep(0.005)
    return _clip(*args, **kwargs)
checkpoint.save_file = slow_save_file
loop.evaluate = evaluate
torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
sys.argv[0] = "gptlab"
runpy.run_module("gptlab", run_name="__main__", alter_sys=True)
"""
_SERVER = multiprocessing.get_context("forkserver")
_SERVER.set_forkserver_preload(["gptlab.cli", "gptlab.train.run", "gptlab.train.loop", "torch._dynamo",
                                "torch.utils.tensorboard", "matplotlib.pyplot"])


def _forked(argv: list[str], cwd: str, env: dict[str, str], log: str, dumps: str) -> None:
    """BOOT in a process forked from the server, output to LOG."""
    os.chdir(cwd)
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    torch.set_num_threads(1)  # torch was imported before OMP_NUM_THREADS=1 was set
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a killed process leaks
    sys.argv = ["-c", dumps, *argv]
    exec(BOOT, {"__name__": "__main__"})


@dataclass
class Run:
    proc: multiprocessing.process.BaseProcess | subprocess.Popen
    log: Path  # its stdout and stderr
    dumps: Path
    seen: int = 0  # how many samples of DUMPS have been read

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll() if isinstance(self.proc, subprocess.Popen) else self.proc.exitcode

    def alive(self) -> bool:
        return self.exitcode is None

    def send(self, sig: int) -> None:
        if self.alive():  # once reaped, its pid may belong to another process
            os.kill(self.proc.pid, sig)

    def finish(self, timeout: float = 300) -> int:
        if isinstance(self.proc, subprocess.Popen):
            self.proc.wait(timeout)
        else:
            self.proc.join(timeout)
        assert self.exitcode is not None, f"the run did not end in {timeout} s"
        return self.exitcode

    def where(self) -> str | None:
        """Sample the phase the main thread is in (None before the process is ready, or once it has ended)."""
        if not (self.alive() and self.dumps.is_file()):
            return None
        self.send(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.alive():
            text = self.dumps.read_text(errors="replace")
            lines = text[:text.rfind("\n") + 1].splitlines()  # complete lines only
            if len(lines) > self.seen:
                self.seen = len(lines)
                return phase_of(lines[-1].split())
            time.sleep(0.0005)
        return None


def launch(workdir: Path, *argv: str, fresh: bool = False) -> Run:
    """Start ``gptlab ARGV`` in WORKDIR: forked from the server, or (``fresh``) as a new interpreter."""
    n = len(list(workdir.glob("log-*.txt")))
    log, dumps = workdir / f"log-{n}.txt", workdir / f"dumps-{n}.txt"
    env = {"GPTLAB_CACHE": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}
    if fresh:
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-c", BOOT, str(dumps), *argv], cwd=workdir,
                                    env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    else:
        proc = _SERVER.Process(target=_forked, args=(list(argv), str(workdir), env, str(log), str(dumps)))
        proc.start()
    return Run(proc, log, dumps)


def phase_of(frames: list[str]) -> str:
    """Name the phase from the function names on the main thread's stack: ``run_job`` (the loop,
    whose ``Run`` methods are its steps), ``Run.save_last`` and ``evaluate`` in gptlab.train.loop,
    ``save_checkpoint`` in gptlab.weights.checkpoint."""
    if "save_checkpoint" in frames:
        return "last/ write" if "save_last" in frames else "best/ write"
    if "evaluate" in frames:
        return "evaluation"
    if "run_job" in frames:
        return "finishing" if {"sample_text", "plot_loss"} & set(frames) else "step"
    return "start-up"


def kill_in(run: Run, run_dir: Path, target: str, rng: random.Random) -> str:
    """SIGKILL ``run`` in phase ``target``, at a random occurrence of it; return where it landed
    ("missed" if the run ended first)."""
    if target.endswith("write"):
        # Watch for the checkpoint's temporary folder, then kill a random moment into the write.
        tmp = run_dir / f".{target.split('/')[0]}.tmp"
        while run.alive() and not tmp.is_dir():
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.03))
        run.send(signal.SIGKILL)
        run.finish()
        if run.exitcode != -signal.SIGKILL:
            return "missed"
        # What the write left behind says whether the kill came before the swap, during it or after.
        name = target.split("/")[0]
        if (run_dir / f".{name}.tmp").is_dir():
            return f"{target} (before the swap)"
        if (run_dir / f".{name}.old").is_dir():
            return f"{target} (between the renames)"
        return f"{target} (just after it)"
    skip = rng.randrange(4)
    while run.alive():
        time.sleep(rng.uniform(0.001, 0.02))
        if run.where() == target:
            if skip == 0:
                run.send(signal.SIGKILL)
                break
            skip -= 1
    run.finish()
    return target if run.exitcode == -signal.SIGKILL else "missed"


def rows(run_dir: Path) -> list[dict[str, float]]:
    """The complete rows of a run's metrics.csv so far (a row being written is left out)."""
    f = run_dir / "metrics.csv"
    text = f.read_text() if f.is_file() else ""
    lines = text[:text.rfind("\n") + 1].splitlines()
    return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(lines)]


def resumable_step(run_dir: Path) -> int:
    """The step ``--resume`` would start from (0 when the run has no complete last/ yet)."""
    try:
        found = ckpt.resolve_checkpoint(run_dir, prefer="last")  # also undoes a swap cut in half
    except UserError:
        return 0
    if found.name != "last":
        return 0
    load_checkpoint(found)  # the weights, config and tokenizer load
    return ckpt.load_train_state(found)[1]["step"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / ckpt.WEIGHTS)), load_file(str(b / ckpt.WEIGHTS))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{a} and {b} differ in {k}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crash")
    (path / TEXT_FILE).write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    """The uninterrupted run."""
    assert launch(workdir, *TRAIN, "--out", "reference").finish() == 0
    return workdir / "reference"


@pytest.fixture(scope="module")
def reference_sharded(workdir) -> Path:
    """The uninterrupted run on the corpus prepared into several shards."""
    prepare_argv = ["prepare", "--corpus", TEXT_FILE, "--tokenizer", "char", "--out", SHARDED,
                    "--shard-tokens", str(SHARD_TOKENS)]
    assert launch(workdir, *prepare_argv).finish() == 0
    assert len(load_prepared(workdir / SHARDED).meta["shards"]["train"]) == 4
    assert launch(workdir, *TRAIN_SHARDED, "--out", "reference-sharded").finish() == 0
    return workdir / "reference-sharded"


# Forked processes for the default run; new interpreters (``python -m gptlab`` as a user runs it)
# in the slow one, which also shows they end exactly where the forked reference does.
LAUNCHERS = ["forked", pytest.param("fresh", marks=pytest.mark.slow)]


# --- kill -9 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["file", "shards"])
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigkill_at_random_moments_resumes_from_the_last_checkpoint_to_identical_weights(workdir, request,
                                                                                        launcher, dataset):
    """``dataset``: the corpus file, prepared on the fly as one shard per split, or the same text
    prepared into several shards, whose loader position is part of the train state too."""
    fresh = launcher == "fresh"
    reference = request.getfixturevalue("reference" if dataset == "file" else "reference_sharded")
    train_argv, kills = (TRAIN if dataset == "file" else TRAIN_SHARDED), KILLS[dataset]
    rng = random.Random(1)
    targets = [PHASES[i % len(PHASES)] for i in range(kills)]
    rng.shuffle(targets)
    # Spread over the run: kill number i comes in the first `target` phase after step afters[i].
    # The last kill comes after step STEPS - 6 * EVERY at the latest: a kill can land several evaluations
    # after its mark (a fast machine trains on while the test samples), and the run must not finish first.
    afters = sorted(rng.sample(range(STEPS - 6 * EVERY), kills))
    run_dir = workdir / f"killed-{launcher}-{dataset}"
    argv = [*train_argv, "--out", run_dir.name]
    landings = []
    for target, after in zip(targets, afters):
        before = len(rows(run_dir))
        start = resumable_step(run_dir)
        run = launch(workdir, *argv, fresh=fresh)
        while start < after and run.alive() and not any(r["step"] >= after for r in rows(run_dir)[before:]):
            time.sleep(0.005)
        landed = kill_in(run, run_dir, target, rng)
        assert landed != "missed", f"the run ended before a kill in its {target}; raise STEPS"
        # An evaluation step's row is written after its checkpoint, so the last row r says which checkpoints are
        # complete; a kill in the last/ write of step r + 1, or in the few lines after it, may find that one done too.
        done = [int(r["step"]) for r in rows(run_dir)[before:]]
        last_row = done[-1] if done else start
        allowed = {last_row // EVERY * EVERY}
        if (last_row + 1) % EVERY == 0 and target in ("step", "last/ write"):
            allowed.add(last_row + 1)
        resumed = resumable_step(run_dir)
        assert resumed in allowed, f"killed in {landed} after step {last_row}: --resume would start at {resumed}"
        landings.append((after, landed, resumed))
        # Before the first last/ there is nothing to resume: the run starts again, as a user would do.
        argv = (["train", "--resume", run_dir.name, "--no-progress"] if resumed
                else [*train_argv, "--out", run_dir.name, "--force"])
    assert launch(workdir, *argv, fresh=fresh).finish() == 0
    assert resumable_step(run_dir) == STEPS
    assert_same_weights(run_dir / "last", reference / "last")
    assert_same_weights(run_dir / "best", reference / "best")
    print("\nkills:", "; ".join(f"after step {after}: {where}, resumed at {step}" for after, where, step in landings))
    print("by phase:", dict(Counter(where.split(" (")[0] for _, where, _ in landings)))


# --- SIGTERM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigterm_saves_at_once_and_resume_ends_identical(workdir, reference, launcher):
    """SIGTERM between two checkpoints: the run saves where it is (without evaluating first) and
    exits 130; ``--resume`` then ends exactly as the uninterrupted run."""
    fresh = launcher == "fresh"
    run_dir = workdir / f"terminated-{launcher}"
    run = launch(workdir, *TRAIN, "--out", run_dir.name, fresh=fresh)
    # Just after the step that follows a checkpoint: it stops there or one step later, between checkpoints.
    while run.alive() and not any(r["step"] == 2 * EVERY + 1 for r in rows(run_dir)):
        time.sleep(0.005)
    run.send(signal.SIGTERM)
    code = run.finish()
    output = run.log.read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and f"resume with: gptlab train --resume {run_dir.name}" in output
    stopped = int(rows(run_dir)[-1]["step"])
    assert resumable_step(run_dir) == stopped
    if stopped % EVERY:  # as usual; a slow machine may deliver the signal only in the next checkpoint's step
        assert "val_loss" not in rows(run_dir)[-1]  # saved without evaluating
    resumed = launch(workdir, "train", "--resume", run_dir.name, "--no-progress", fresh=fresh)
    assert resumed.finish() == 0, resumed.log.read_text()[-3000:]
    assert [r["step"] for r in rows(run_dir)][stopped:stopped + 2] == [stopped + 1, stopped + 2]
    assert_same_weights(run_dir / "last", reference / "last")
    assert_same_weights(run_dir / "best", reference / "best")


# --- every writer cut off midway ------------------------------------------------------------------

class Crash(BaseException):
    """The process dying at this point (nothing after it runs, no except clause catches it)."""


@dataclass
class Writer:
    module: ModuleType  # its write_json is made to fail, after the writer's first file is written
    write: Callable[[Path, int], None]  # write version N of the thing to DIR/out
    read: Callable[[Path], object]


def _model(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=CHARS.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8))


def _write_shards(folder: Path, version: int) -> None:
    (folder / "corpus.txt").write_text(TEXT * version)
    prepare(str(folder / "corpus.txt"), "char", folder / "out", force=True)


def _write_export(folder: Path, version: int) -> None:
    model = _model(version)
    export_hf(ckpt.Checkpoint(folder, model, model.config, CHARS), folder / "out", family="gpt2")


def _write_adapter(folder: Path, version: int) -> None:
    model = _model(0)
    add_lora(model, LoRAConfig(rank=2, targets=("q_proj",)))
    torch.manual_seed(version)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    save_adapter(folder / "out", model, LoRAConfig(rank=2, targets=("q_proj",)), "base")


CHARS = CharTokenizer.train(TEXT)
WRITERS = {
    "shards": Writer(prepare_module, _write_shards, load_prepared),
    "export": Writer(hf_module, _write_export, load_checkpoint),
    "lora adapter": Writer(adapter_module, _write_adapter, load_adapter),
    "checkpoint": Writer(ckpt, lambda folder, v: ckpt.save_checkpoint(folder / "out", _model(v), CHARS),
                         load_checkpoint),
}


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("previous", [True, False], ids=["over a previous version", "new"])
@pytest.mark.parametrize("cut", ["a file write fails", "dies between the renames"])
@pytest.mark.parametrize("name", WRITERS)
def test_interrupted_write_leaves_the_previous_version_or_nothing(tmp_path, monkeypatch, name, cut, previous):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    writer, out = WRITERS[name], tmp_path / "out"
    if previous:
        writer.write(tmp_path, 1)
    before = snapshot(out)
    with monkeypatch.context() as m:
        if cut == "a file write fails":
            def fail(*args, **kwargs):
                raise OSError(28, "No space left on device")

            m.setattr(writer.module, "write_json", fail)
        else:
            rename = Path.rename

            def dying_rename(self: Path, target) -> Path:
                if Path(target) == out and self != out:  # the new folder moving into place
                    raise Crash
                return rename(self, target)

            m.setattr(Path, "rename", dying_rename)
        with pytest.raises((OSError, Crash)):
            writer.write(tmp_path, 2)
    if previous:
        writer.read(out)  # readers put back a folder whose swap was cut in half
        assert snapshot(out) == before
    else:
        assert not out.exists()
        with pytest.raises(UserError):
            writer.read(out)
    if cut == "a file write fails":
        # Cleaned up; but prepare keeps its finished shards, and no unfinished one, for the next run to continue from.
        kept = {".out.partial"} if name == "shards" else set()
        assert {p.name for p in tmp_path.iterdir() if p.name.startswith(".out")} <= kept
        assert not list(tmp_path.glob(".out.partial/*.part"))
    writer.write(tmp_path, 2)  # and the next write succeeds over whatever was left
    writer.read(out)
    assert snapshot(out) != before


def test_sigkill_during_prepare_leaves_the_old_shards_or_the_new_and_the_same_command_continues(workdir):
    """``gptlab prepare`` killed while it encodes (in worker processes) or writes its shards over
    an older version: the folder holds the old version or the new one, whole, and running the
    same command again ends with exactly the shards of an uninterrupted run."""
    big = workdir / "big.txt"
    big.write_text(TEXT * 400)  # 3.3 MB: its shards take a while to encode, write and flush
    argv = ["prepare", "--tokenizer", "char", "--shard-tokens", "300000"]
    for corpus, out in ((TEXT_FILE, "old"), (big.name, "new")):
        assert launch(workdir, *argv, "--corpus", corpus, "--out", out).finish() == 0
    versions = [snapshot(workdir / "old"), snapshot(workdir / "new")]
    assert len(versions[1]) > 4  # several shards
    shutil.rmtree(workdir / "data", ignore_errors=True)
    shutil.copytree(workdir / "old", workdir / "data")
    seen = set()
    for delay in (0.0, 0.05, 0.2):  # seconds into the work; each run continues the one before
        run = launch(workdir, *argv, "--corpus", big.name, "--out", "data", "--force")
        while run.alive() and not (workdir / ".data.partial").is_dir():
            time.sleep(0.0005)
        time.sleep(delay)
        run.send(signal.SIGKILL)
        run.finish()
        load_prepared(workdir / "data")
        assert snapshot(workdir / "data") in versions
        seen.add(versions.index(snapshot(workdir / "data")))
    assert 0 in seen  # the kills landed inside the work, not only after it
    assert launch(workdir, *argv, "--corpus", big.name, "--out", "data", "--force").finish() == 0
    assert snapshot(workdir / "data") == versions[1] and not (workdir / ".data.partial").exists()
