"""DDP and FSDP2 under torchrun, on the CPU with the gloo backend and 2 processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gptlab.train.distributed import read_sharded_metadata
from gptlab.train.metrics import read_metrics

TEXT = "".join(f"{who}: {line}\n" for who, line in [
    ("ROMEO", "But soft, what light through yonder window breaks?"),
    ("JULIET", "O Romeo, Romeo, wherefore art thou Romeo?"),
    ("HAMLET", "To be, or not to be, that is the question."),
]) * 60
# 20 steps of the tiny preset; 8 sequences per step in every run (one process x 8, or two x 4).
# fp32 pinned: the runs are compared to 1e-4, which holds for fp32's summation-order noise; under
# bf16 autocast (8-bit mantissa) two processes and one already differ by 6e-4 at the first loss.
TRAIN = ["--preset", "tiny", "--max-steps", "20", "--eval-interval", "10", "--log-interval", "5", "--no-progress",
         "--device", "cpu", "--lr", "1e-2", "--dtype", "fp32"]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    (tmp_path / "c.txt").write_text(TEXT)
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gptlab(*args: str, procs: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """Run the gptlab command: plainly (procs=0) or under torchrun with ``procs`` processes."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                 str(free_port())] if procs else [sys.executable])
    result = subprocess.run([*launcher, "-m", "gptlab", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in read_metrics(run / "metrics.csv") if "train_loss" in r]


def weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / which / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, tol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("k_proj.bias"):
            # Softmax ignores a constant added to every score, so this bias's true gradient is 0:
            # it gets float noise, which Adam scales up to full-size steps. It carries no signal.
            continue
        torch.testing.assert_close(wa[k], wb[k], rtol=tol, atol=tol, msg=k)


def test_ddp_two_processes_match_one_with_the_same_global_batch(workdir):
    gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "8", "--out", "one")
    ddp = gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "4", "--out", "ddp", procs=2)
    assert "2 processes (DDP)" in ddp.stdout + ddp.stderr
    assert ddp.stdout.count("checkpoint:") == 1  # only rank 0 reports
    torch.testing.assert_close(losses(workdir / "ddp"), losses(workdir / "one"), rtol=1e-4, atol=1e-4)
    assert_same_weights(workdir / "ddp", workdir / "one")


def test_finetune_under_torchrun_claims_out_and_reports_once(workdir):
    """Rank 0 alone replaces the earlier run in --out (the command joins the process group
    first, as ``train`` does) and prints the report; every rank trains."""
    gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "8", "--out", "base")
    chat = '{"messages": [{"role": "user", "content": "But soft?"}, {"role": "assistant", "content": "O Romeo."}]}'
    (workdir / "chats.jsonl").write_text((chat + "\n") * 16)
    sft = ["finetune", "sft", "base", "--data", "chats.jsonl", "--max-steps", "4", "--batch-size", "4",
           "--no-progress", "--device", "cpu", "--out", "sft"]
    gptlab(*sft)
    two = gptlab(*sft, "--force", procs=2)
    assert two.stdout.count("try: gptlab chat sft") == 1 and two.stdout.count("checkpoint:") == 1
    assert [r["step"] for r in read_metrics(workdir / "sft" / "metrics.csv") if r.get("train_loss")][-1] == 4
    assert (workdir / "sft" / "best" / "model.safetensors").exists()


def test_mismatched_settings_stop_every_rank_with_one_message(workdir):
    """Two processes of one run started with different flags (as on two nodes): both stop, no hang."""
    port = free_port()
    procs = []
    for rank, lr in ((0, "1e-2"), (1, "3e-3")):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "gptlab", "train", *TRAIN, "--corpus", "c.txt",
                                       "--batch-size", "4", "--out", "bad", "--lr", lr],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 1
        assert "started with different settings" in err and "Traceback" not in err


@pytest.mark.slow
def test_ddp_run_resumes_in_one_process(workdir):
    gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "8", "--out", "straight")
    gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "4", "--out", "split", "--max-tokens", "2560",
           procs=2)  # 10 steps of 8 x 32 tokens
    assert read_metrics(workdir / "split" / "metrics.csv")[-1]["step"] == 10
    gptlab("train", "--resume", "split", "--batch-size", "8", "--max-tokens", "100000", "--no-progress")
    assert_same_weights(workdir / "split", workdir / "straight")


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_with_another_process_count(workdir):
    gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "8", "--out", "one")
    fsdp = gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "4", "--out", "fsdp", "--fsdp", procs=2)
    assert "2 processes (FSDP)" in fsdp.stdout + fsdp.stderr
    torch.testing.assert_close(losses(workdir / "fsdp"), losses(workdir / "one"), rtol=1e-4, atol=1e-4)
    assert_same_weights(workdir / "fsdp", workdir / "one")
    # The sharded optimizer state: tensors and an index that reads without unpickling anything else.
    index = read_sharded_metadata(workdir / "fsdp" / "last" / "distributed")
    assert index.state_dict_metadata and all(isinstance(v, TensorStorageMetadata)
                                             for v in index.state_dict_metadata.values())

    # Stop after 10 steps on 2 processes, finish on 1: the same as 20 steps straight.
    gptlab("train", *TRAIN, "--corpus", "c.txt", "--batch-size", "4", "--out", "split", "--fsdp",
           "--max-tokens", "2560", procs=2)
    gptlab("train", "--resume", "split", "--batch-size", "8", "--max-tokens", "100000", "--no-progress", procs=1)
    assert_same_weights(workdir / "split", workdir / "one")
    # A sharded run is not resumed by accident without FSDP.
    plain = gptlab("train", "--resume", "split", "--no-fsdp", "--max-steps", "30", "--no-progress", check=False)
    assert plain.returncode == 1 and "resume it with --fsdp" in plain.stderr
