"""A soak of `gptlab serve` in its own process: 64 clients for a few seconds, a mix of chat and
plain completions, streamed or whole, some clients leaving mid-stream and some requests
deliberately invalid. Every answer must be complete, every error deliberate, and afterwards no
generation slot may be left taken. ``benchmarks/serve_soak.py`` runs the same soak for minutes
and reports the server's memory."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
import test_serve_signals
from test_serve_signals import ServerProcess

tiny_run = test_serve_signals.tiny_run  # the fixture: the shared tiny model as a checkpoint directory

MAX_CONCURRENCY, MAX_QUEUE, MAX_BODY_BYTES = 4, 32, 65536
#: the server's flags: a queue shorter than the clients, so a full queue's 503 is part of the soak
SERVER_FLAGS = ("--max-concurrency", str(MAX_CONCURRENCY), "--max-queue", str(MAX_QUEUE),
                "--max-body-bytes", str(MAX_BODY_BYTES))
#: the deliberate errors: (name, what to add to a valid chat request, status, error code)
INVALID = [("too many messages", {"messages": [{"role": "user", "content": "hi"}] * 257}, 400,
            "array_above_max_length"),
           ("oversized body", {"padding": "x" * MAX_BODY_BYTES}, 413, "request_too_large"),
           ("bad temperature", {"temperature": 9}, 400, None)]


@dataclass
class Tally:
    """What the clients saw: counts of (request kind, outcome), and every failure explained."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, of complete answers
    completion_tokens: int = 0

    def fail(self, what: str, why: str) -> None:
        self.counts[what, "FAILED"] += 1
        self.failures.append(f"{what}: {why}")


def valid_request(rng: random.Random, model: str) -> tuple[str, dict]:
    """A random valid request: its path and body (the tiny model knows only the characters of
    "User: hello\nAssistant: hi there", and has a 64-character context)."""
    body = {"model": model, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.8, 1.2]),
            "seed": rng.randrange(1 << 16), "stream": rng.random() < 0.6}
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}] * (rng.random() < 0.3)
        return "chat/completions", {**body, "messages": earlier + [{"role": "user", "content": "hello"}]}
    return "completions", {**body, "prompt": "User: hello\nAssistant:"}


def check_whole(answer: dict, max_tokens: int) -> str | None:
    """Why a whole answer is incomplete, or None."""
    choice, usage = answer["choices"][0], answer.get("usage") or {}
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"finish_reason {choice.get('finish_reason')!r}"
    if not (0 < usage.get("completion_tokens", 0) <= max_tokens
            and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]):
        return f"usage {usage}"
    return None


def check_stream(lines: list[str], body: dict) -> str | None:
    """Why a stream is incomplete or malformed, or None."""
    if not lines or lines[-1] != "data: [DONE]":
        return f"ends with {lines[-1:]!r}, not [DONE]"
    if not all(line.startswith("data: ") for line in lines):
        return "a line that is not a data: event"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    if any("error" in c for c in chunks):
        return f"an error event {chunks[-1]}"
    if body.get("stream_options"):
        usage_chunk, chunks = chunks[-1], chunks[:-1]
        if usage_chunk["choices"] or not 0 < usage_chunk["usage"]["completion_tokens"] <= body["max_tokens"]:
            return f"the usage chunk {usage_chunk}"
    if not chunks or chunks[-1]["choices"][0].get("finish_reason") not in ("stop", "length"):
        return "no finish_reason before [DONE]"
    return None


async def one_request(http: httpx.AsyncClient, rng: random.Random, model: str, tally: Tally) -> bool:
    """Send one request of a random kind and tally it; True if the server was busy (503)."""
    path, body = valid_request(rng, model)
    what = f"{path.split('/')[0]} {'stream' if body['stream'] else 'whole'}"
    leave_after = expected = None
    if rng.random() < 0.05:
        name, change, status, code = rng.choice(INVALID)
        path, body, what, expected = "chat/completions", {**body, **change, "stream": False}, name, (status, code)
    elif body["stream"] and rng.random() < 0.15:
        leave_after, what = rng.randint(1, 4), what + " (client leaves)"
    start = time.monotonic()
    lines: list[str] = []
    try:
        async with http.stream("POST", f"/v1/{path}", json=body) as response:
            if response.status_code == 200 and body["stream"]:
                async for line in response.aiter_lines():
                    lines += [line] if line else []
                    if len(lines) == leave_after:
                        break  # leaving the block closes the connection mid-stream
            else:
                answer = json.loads(await response.aread())
    except httpx.HTTPError as e:  # a dropped connection, a truncated body, a timeout
        tally.fail(what, f"{type(e).__name__} after {time.monotonic() - start:.2f} s, {len(lines)} events: "
                         f"{e!r} (cause: {e.__cause__ or e.__context__!r})")
        return False
    status = response.status_code
    tally.counts[what, status] += 1
    error = answer.get("error", {}) if status != 200 else {}
    if expected or status != 200:
        busy = status == 503 and error.get("code") == "server_busy"
        if (status, error.get("code")) != (expected or (503, "server_busy")):
            tally.fail(what, f"got {status} {error}, expected {expected or 'an answer'}")
        return busy and not expected
    if leave_after:
        return False
    problem = check_stream(lines, body) if body["stream"] else check_whole(answer, body["max_tokens"])
    if problem:
        tally.fail(what, problem)
    else:
        tally.latencies.append(time.monotonic() - start)
        if not body["stream"]:
            tally.completion_tokens += answer["usage"]["completion_tokens"]
    return False


async def soak(url: str, model: str, clients: int, seconds: float, seed: int = 0) -> Tally:
    """``clients`` clients, each sending requests one after another for ``seconds``; a client
    told the server is busy waits a moment, as a polite client would."""
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def client(rng: random.Random, http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            if await one_request(http, rng, model, tally):
                await asyncio.sleep(rng.uniform(0.05, 0.25))

    # Idle connections are dropped sooner than uvicorn's 5 s keep-alive timeout: at the same
    # 5 s (httpx's default) a client may reuse a connection just as the server closes it, a
    # race of HTTP/1.1 keep-alive that any client must allow for, not a fault of the server.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(random.Random(seed * 1000 + i), http) for i in range(clients)))
    return tally


async def all_slots_free(url: str, model: str) -> list[int]:
    """The statuses of as many requests at once as the server admits: all 200 unless a
    generation slot or a queue place was never given back."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        responses = await asyncio.gather(*(http.post("/v1/completions", json={"model": model, "prompt": "hi",
                                                                               "max_tokens": 2})
                                           for _ in range(MAX_CONCURRENCY + MAX_QUEUE)))
    return [r.status_code for r in responses]


@pytest.mark.slow
def test_sixty_four_clients_for_fifteen_seconds(tiny_run):
    with ServerProcess(tiny_run, *SERVER_FLAGS) as server:
        tally = asyncio.run(soak(server.url, server.model, clients=64, seconds=15))
        assert not tally.failures, "\n".join(tally.failures[:20])
        kinds = {what for what, _ in tally.counts}
        assert {"chat stream", "chat whole", "completions stream", "completions whole"} <= kinds
        assert any("client leaves" in what for what in kinds) and any(what in kinds for what, *_ in INVALID)
        assert all(status in (200, 400, 413, 503) for _, status in tally.counts)
        assert len(tally.latencies) > 64
        assert asyncio.run(all_slots_free(server.url, server.model)) == [200] * (MAX_CONCURRENCY + MAX_QUEUE)
        assert server.stop(signal.SIGINT, timeout=30)[0] == 0 and "Traceback" not in server.log()
