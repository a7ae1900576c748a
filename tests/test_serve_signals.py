"""`gptlab serve` as a real process, stopped with SIGTERM and with Ctrl-C (SIGINT) while it
answers: running answers finish within ``--shutdown-grace`` or are ended with a 503 error
told in-band, the response bodies end properly, and the process exits with 0 and no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_serve import HI

from gptlab.weights.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def tiny_run(engine, tmp_path_factory) -> Path:
    """The shared tiny model saved as a checkpoint directory, for a server in another process."""
    path = tmp_path_factory.mktemp("serve_process") / "tiny"
    save_checkpoint(path, engine.model, engine.tokenizer)
    return path


class ServerProcess:
    """``gptlab serve MODEL FLAGS`` in a child process on a free port, ready once /health answers.
    Its stderr goes to a file (``log()``); leaving the ``with`` block kills it if still running."""

    def __init__(self, model: Path, *flags: str, host: str = "127.0.0.1", start_timeout: float = 120):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.model = f"http://127.0.0.1:{port}", Path(model).name
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptlab", "serve", str(model), "--host", host, "--port", str(port),
             "--device", "cpu", *flags], stdout=subprocess.DEVNULL, stderr=self.stderr,
            env={**os.environ, "TQDM_DISABLE": "1"})
        deadline = time.monotonic() + start_timeout
        while True:
            assert self.proc.poll() is None, f"gptlab serve exited with {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"gptlab serve did not start:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def memory_kib(self) -> dict[str, int]:
        """The process's resident memory now (VmRSS) and its peak so far (VmHWM), in KiB."""
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return {key: int(line.split()[1]) for line in lines for key in ("VmRSS", "VmHWM") if line.startswith(key + ":")}

    def stop(self, signum: int, timeout: float) -> tuple[int, float]:
        """Send ``signum``; return the exit status and the seconds it took to exit."""
        start = time.monotonic()
        self.proc.send_signal(signum)
        return self.proc.wait(timeout), time.monotonic() - start

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def chat_stream(server: ServerProcess, max_tokens: int) -> httpx.Response:
    """Open a streaming chat request (enter it with ``with``)."""
    return httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                        json={"model": server.model, "messages": HI, "max_tokens": max_tokens, "stream": True,
                              "temperature": 1.0, "seed": 1})


def test_sigterm_lets_a_running_answer_finish_then_exits_cleanly(tiny_run):
    with ServerProcess(tiny_run, "--shutdown-grace", "60", host="0.0.0.0") as server:
        assert "warning: serving on 0.0.0.0 without --api-key" in server.log()
        with chat_stream(server, max_tokens=40) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # under way
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        answered = time.monotonic()
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])["choices"][0]
        assert last["finish_reason"] in ("length", "stop")
        pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in rest[:-2]]
        assert 0 < len("".join(pieces)) <= 40
        assert server.proc.wait(20) == 0, server.log()  # once nothing runs, it exits (in well under a second
        assert time.monotonic() - answered < 20         # when the machine is not shared)
        assert "Traceback" not in server.log() and "ERROR" not in server.log()


def test_ctrl_c_cuts_answers_after_the_grace_period_then_exits_cleanly(tiny_run):
    grace = 1.0
    with ServerProcess(tiny_run, "--shutdown-grace", str(grace)) as server:
        assert "warning" not in server.log()
        # One answer far longer than the grace period, and one waiting for the only generation
        # slot (a chat stream sends its role chunk at once, so the client sees it was admitted).
        with chat_stream(server, max_tokens=4000) as running, chat_stream(server, max_tokens=5) as waiting:
            running_lines, waiting_lines = running.iter_lines(), waiting.iter_lines()
            seen = [next(running_lines) for _ in range(6)]  # the role chunk and some text
            queued = [next(waiting_lines)]
            server.proc.send_signal(signal.SIGINT)
            start = time.monotonic()
            seen += list(running_lines)  # both bodies end properly: no error from the client
            queued += list(waiting_lines)
        for lines, why in ((seen, "before the answer was finished"), (queued, "before this request's turn came")):
            error = json.loads([line for line in lines if line][-1][6:])["error"]
            assert (error["code"], error["type"]) == ("server_shutdown", "server_error") and why in error["message"]
        assert "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in seen[:6] if line)
        assert server.proc.wait(grace + 20) == 0, server.log()
        assert time.monotonic() - start < grace + 20
        assert "Traceback" not in server.log() and "ERROR" not in server.log()
