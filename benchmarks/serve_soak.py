"""Soak `gptlab serve`: many concurrent clients for minutes against a tiny model served in its
own process, then print what they saw and the server's memory.

The clients and their checks are those of ``tests/test_serve_soak.py``: a mix of chat and plain
completions, streamed or whole, about one stream in seven left by its client after a few events,
and one request in twenty deliberately invalid (too many messages, an oversized body, a bad
temperature), which must get its 400 or 413. Every answer must be complete (a whole one has its
finish_reason and consistent usage; a stream ends with a finish_reason and ``[DONE]``), and the
only 5xx allowed is the deliberate 503 of a full queue (``server_busy``). Afterwards as many
requests as the server admits are sent at once, and all must be answered (no slot was leaked),
and SIGTERM must end the server with exit status 0. The server's resident memory (VmRSS) is
read from /proc at the start, every second (its peak, VmHWM, from the kernel) and at the end.

    .venv/bin/python benchmarks/serve_soak.py                    # 64 clients for 120 s
    .venv/bin/python benchmarks/serve_soak.py --clients 16 --seconds 30 --model runs/mine
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_serve_soak as harness  # noqa: E402
from test_serve_signals import ServerProcess  # noqa: E402


def tiny_model(out: Path) -> Path:
    """A from-scratch character model trained for a few steps on one short exchange."""
    from gptlab.config import resolve_config
    from gptlab.train.loop import train

    corpus = out / "chat.txt"
    corpus.write_text("User: hello\nAssistant: hi there\n" * 300)
    os.environ["GPTLAB_CACHE"] = str(out / "cache")
    model_cfg, cfg = resolve_config("tiny", model_overrides={"block_size": 64},
                                    train_overrides={"corpus": str(corpus), "max_steps": 3, "warmup_steps": 1})
    train(model_cfg, cfg, out / "tiny", show_progress=False)
    return out / "tiny"


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--model", type=Path, default=None,
                    help="a checkpoint directory whose tokenizer knows the characters of 'User: hello\\nAssistant: "
                         "hi there' (default: train a tiny one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        with ServerProcess(model, *harness.SERVER_FLAGS) as server:
            start_memory, load_before = server.memory_kib(), os.getloadavg()
            samples, done = [start_memory["VmRSS"]], threading.Event()

            def sample() -> None:
                while not done.wait(1.0):
                    samples.append(server.memory_kib()["VmRSS"])

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            began = time.monotonic()
            tally = asyncio.run(harness.soak(server.url, server.model, args.clients, args.seconds, args.seed))
            took = time.monotonic() - began
            done.set()
            sampler.join()
            end_memory, load_after = server.memory_kib(), os.getloadavg()
            statuses = asyncio.run(harness.all_slots_free(server.url, server.model))
            exit_status, exit_seconds = server.stop(signal.SIGTERM, timeout=60)
            traceback_seen = "Traceback" in server.log()

    print(f"{args.clients} clients for {took:.0f} s against gptlab serve {' '.join(harness.SERVER_FLAGS)}")
    print(f"load average (1, 5, 15 min): before {', '.join(f'{x:.2f}' for x in load_before)}; "
          f"after {', '.join(f'{x:.2f}' for x in load_after)}")
    print("\nrequests by kind and status:")
    for (what, status), n in sorted(tally.counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {what:36} {status!s:>6} {n:7d}")
    total = sum(tally.counts.values())
    busy = sum(n for (_, status), n in tally.counts.items() if status == 503)
    print(f"  {'all':36} {'':>6} {total:7d}  ({total / took:.1f}/s; {busy} busy 503s)")
    if tally.latencies:
        q = statistics.quantiles(tally.latencies, n=20)
        print(f"complete answers checked: {len(tally.latencies)}; latency median {statistics.median(tally.latencies):.2f} s, "
              f"p95 {q[18]:.2f} s, max {max(tally.latencies):.2f} s")
    # The kernel updates VmHWM lazily, so a 1 s sample can exceed it.
    peak = max(end_memory["VmHWM"], *samples)
    print(f"server memory: start {mib(start_memory['VmRSS'])}, peak {mib(peak)} (VmHWM {mib(end_memory['VmHWM'])}, "
          f"highest 1 s sample {mib(max(samples))}), end {mib(end_memory['VmRSS'])}")
    print(f"  every 15 s: {', '.join(mib(kib) for kib in samples[::15])}")
    free = statuses.count(200)
    print(f"afterwards: {free} of {len(statuses)} simultaneous requests answered (all slots free: "
          f"{free == len(statuses)}); SIGTERM -> exit status {exit_status} in {exit_seconds:.1f} s")

    problems = [*tally.failures]
    if free != len(statuses):
        problems.append(f"after the soak only {free} of {len(statuses)} simultaneous requests were answered: {statuses}")
    if exit_status != 0 or traceback_seen:
        problems.append(f"the server exited with {exit_status}{' and a traceback' if traceback_seen else ''}")
    print(f"\nfailures: {len(problems)}")
    for problem in problems[:20]:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
