"""`gptlab serve`'s request limits (``Limits``): each is enforced with a 4xx error in OpenAI's
shape, the body's size before any of it is parsed, and a slow prompt does not stall the server."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from live_server import serve
from test_serve import HI, MODEL, error_of

from gptlab.cli import main
from gptlab.cli.generate import SERVE_LIMIT_FLAGS
from gptlab.errors import UserError
from gptlab.serve.app import create_app
from gptlab.serve.limits import Limits

LIMITS = Limits(max_body_bytes=2000, max_messages=3, max_input_chars=20, max_tokens=5)


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    yield from serve(create_app(engine, MODEL, limits=LIMITS))


def raw_exchange(url: str, head: str, body: bytes) -> tuple[int, dict]:
    """Send ``head`` (request line and headers) and ``body`` on a socket, leaving the request
    unfinished when the body is short of what the headers promise; return the response."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        headers, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        while len(rest) < length:
            rest += s.recv(65536)
    return int(headers.split()[1]), json.loads(rest)


def test_an_oversized_body_gets_413_before_it_is_parsed(url):
    head = "POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Type: application/json\n"
    # A length that is announced is refused before a byte of the body is sent.
    status, body = raw_exchange(url, head + "Content-Length: 50000000\n", b"")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # A chunked body is counted as it arrives: refused while the client is still sending it.
    chunk = b"x" * 1000
    status, body = raw_exchange(url, head + "Transfer-Encoding: chunked\n", b"%x\r\n%s\r\n" % (len(chunk), chunk) * 3)
    assert status == 413 and "2000 bytes" in body["error"]["message"]

    request = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 2}).encode()
    padded = request[:-1] + b" " * (LIMITS.max_body_bytes - len(request)) + b"}"  # exactly at the limit
    assert httpx.post(f"{url}/v1/chat/completions", content=padded).status_code == 200
    as_chunks = iter([padded[:1000], padded[1000:]])  # a generator: sent chunked, no Content-Length
    assert httpx.post(f"{url}/v1/chat/completions", content=as_chunks).status_code == 200
    over = padded[:-1] + b" }"
    assert error_of(httpx.post(f"{url}/v1/chat/completions", content=over), 413)["code"] == "request_too_large"
    assert error_of(httpx.post(f"{url}/v1/completions", content=iter([over[:1000], over[1000:]])),
                    413)["code"] == "request_too_large"


def test_messages_input_length_and_max_tokens_have_limits(url):
    def chat(messages: list[dict], **extra) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages, **extra})

    three = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}]
    assert chat(three).status_code == 200
    error = error_of(chat(three + HI), 400)
    assert (error["param"], error["code"]) == ("messages", "array_above_max_length") and "3" in error["message"]

    twenty = [{"role": "user", "content": "h" * 10}, {"role": "assistant", "content": "i" * 5},
              {"role": "user", "content": "hello"}]
    assert chat(twenty).status_code == 200
    twenty[0]["content"] += "h"
    assert error_of(chat(twenty), 400)["code"] == "string_above_max_length"
    complete = f"{url}/v1/completions"
    assert httpx.post(complete, json={"model": MODEL, "prompt": "h" * 20}).status_code == 200
    error = error_of(httpx.post(complete, json={"model": MODEL, "prompt": "h" * 21}), 400)
    assert (error["param"], error["code"]) == ("prompt", "string_above_max_length")

    assert error_of(chat(HI, max_tokens=6), 400)["param"] == "max_tokens"
    answer = chat(HI, temperature=0).json()  # no max_tokens: the default is cut to the limit
    assert answer["usage"]["completion_tokens"] <= 5
    assert error_of(chat(HI, stop="s" * 257), 400)["param"] == "stop"
    assert error_of(chat(HI, stop=["a", "b", "c", "d", "e"]), 400)["param"] == "stop"
    assert chat(HI, stop="s" * 256, max_tokens=5).status_code == 200


def test_limits_are_checked_and_reach_the_command_line(monkeypatch):
    with pytest.raises(UserError, match="--max-messages must be a positive whole number, got 0"):
        Limits(max_messages=0)
    with pytest.raises(UserError, match="shutdown_grace"):
        create_app(None, MODEL, shutdown_grace=-1)
    for name, help_text in SERVE_LIMIT_FLAGS.items():  # the help states the real defaults
        assert f"(default: {getattr(Limits(), name)})" in help_text

    given = {}
    monkeypatch.setattr("gptlab.serve.run_server", lambda model, **kw: given.update(kw, model=model))
    assert main(["serve", "run", "--max-messages", "3", "--max-body-bytes", "999", "--max-queue", "0",
                 "--shutdown-grace", "0.5"]) == 0
    assert given["limits"] == Limits(max_messages=3, max_body_bytes=999)
    assert (given["max_queue"], given["shutdown_grace"], given["max_concurrency"]) == (0, 0.5, 1)


class SlowPromptEngine:
    """The real engine, except that rendering a chat prompt waits for ``go``."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.block_size = engine, engine.tokenizer, engine.block_size
        self.rendering, self.go = threading.Event(), threading.Event()

    def chat_prompt(self, messages, max_new_tokens):
        self.rendering.set()
        self.go.wait(10)
        return self.engine.chat_prompt(messages, max_new_tokens)

    def stream(self, prompt_ids, params):
        return self.engine.stream(prompt_ids, params)


def test_a_slow_prompt_does_not_stall_other_requests(engine):
    slow = SlowPromptEngine(engine)
    for url in serve(create_app(slow, MODEL)):
        answers = []
        asking = threading.Thread(target=lambda: answers.append(httpx.post(
            f"{url}/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2}, timeout=20)))
        asking.start()
        assert slow.rendering.wait(5)
        # The prompt is prepared in a thread, so the server still answers meanwhile.
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                          timeout=2).status_code == 200
        slow.go.set()
        asking.join(20)
        assert answers[0].status_code == 200
