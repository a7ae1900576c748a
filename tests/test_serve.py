"""`gptlab serve`: the OpenAI-compatible API (through the official client) and the chat page,
on a real uvicorn server in a background thread with a tiny from-scratch model."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from live_server import serve

from gptlab.inference.engine import Completion, Engine, SamplingParams
from gptlab.serve import app as serve_app
from gptlab.serve.app import create_app

MODEL = "tiny-test"
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    yield from serve(create_app(engine, MODEL))


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_chat_whole_and_streamed_with_usage(engine, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, seed=3)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    usage = whole.usage
    assert usage.prompt_tokens == len(engine.chat_prompt(HI, 8).ids)
    assert usage.completion_tokens == len(engine.tokenizer.encode(text)) <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert whole.choices[0].finish_reason == ("length" if usage.completion_tokens == 8 else "stop")

    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, seed=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # same seed, same text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == usage


def test_completions_whole_and_streamed(engine, client):
    whole = client.completions.create(model=MODEL, prompt="User: hello\nAssistant:", max_tokens=10, seed=1,
                                      temperature=0)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == len("User: hello\nAssistant:")
    pieces = list(client.completions.create(model=MODEL, prompt="User: hello\nAssistant:", max_tokens=10,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason in ("stop", "length")


def test_stop_and_seed(client):
    def complete(**kw) -> str:
        return client.completions.create(model=MODEL, prompt="hello", max_tokens=20, temperature=1.5, **kw
                                          ).choices[0].text

    first, again, other = complete(seed=7), complete(seed=7), complete(seed=8)
    assert first == again != other
    cut = next(c for c in first[2:] if c.strip())
    stopped = client.completions.create(model=MODEL, prompt="hello", max_tokens=20, temperature=1.5, seed=7,
                                        stop=[cut, "never seen"])
    assert stopped.choices[0].text == first[:first.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_errors_have_openai_bodies(url, client):
    post = f"{url}/v1/chat/completions"
    assert "JSON" in error_of(httpx.post(post, content=b"{not json"), 400)["message"]
    assert error_of(httpx.post(post, json={"model": MODEL}), 400)["param"] == "messages"
    assert error_of(httpx.post(post, json={"model": MODEL, "messages": [{"role": "user"}]}),
                    400)["param"] == "messages[0].content"
    assert error_of(httpx.post(post, json={"model": "gpt-4", "messages": HI}), 404)["code"] == "model_not_found"
    for bad in ({"temperature": 5}, {"top_p": 0}, {"max_tokens": 0}, {"stop": 3}, {"seed": "x"}):
        error_of(httpx.post(post, json={"model": MODEL, "messages": HI, **bad}), 400)
    long = [{"role": "user", "content": "hello " * 40}]
    assert error_of(httpx.post(post, json={"model": MODEL, "messages": long}), 400)["code"] == "context_length_exceeded"
    completions = f"{url}/v1/completions"
    assert error_of(httpx.post(completions, json={"model": MODEL, "prompt": "hello " * 40}),
                    400)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.chat.completions.create(model=MODEL, messages=HI, n=2)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_api_key_is_required_when_set(engine):
    for url in serve(create_app(engine, MODEL, api_key="s3cret")):
        for key in ("wrong", "s3cre"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
        assert error_of(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(url).status_code == 200


def test_an_int8_engine_serves_the_api_and_the_page(engine):
    """``gptlab serve --quantize int8``: the same answers an int8 engine gives directly."""
    import copy
    from types import SimpleNamespace

    checkpoint = SimpleNamespace(model=copy.deepcopy(engine.model), tokenizer=engine.tokenizer, path=".",
                                 config=engine.model.config, tokenizer_config=None)
    quantized = Engine(checkpoint, quantize="int8")
    expected = quantized.generate_batch([quantized.chat_prompt(HI, 8).ids],
                                        SamplingParams(temperature=0, max_new_tokens=8))[0]
    for url in serve(create_app(quantized, MODEL)):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == expected.text
        assert "<html" in httpx.get(url).text.lower()


def test_eight_concurrent_streams_all_complete(client):
    def one(seed: int) -> tuple[str, str]:
        stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=seed, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices), seed

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for text, seed in results:  # each equals the same request made alone
        alone = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, seed=seed)
        assert text == alone.choices[0].message.content


class GatedEngine:
    """The real engine, except that each piece waits for ``go`` and it notes being stopped."""

    def __init__(self, engine: Engine):
        self.engine, self.tokenizer, self.block_size = engine, engine.tokenizer, engine.block_size
        self.go, self.started, self.closed = threading.Event(), threading.Event(), threading.Event()

    def chat_prompt(self, messages, max_new_tokens):
        return self.engine.chat_prompt(messages, max_new_tokens)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Generator[str, None, Completion]:
        try:
            for _ in range(params.max_new_tokens):
                self.started.set()
                self.go.wait(10)
                yield "e"
        finally:
            self.closed.set()
        return Completion("e" * params.max_new_tokens, [0] * params.max_new_tokens, "length")


def test_full_queue_gets_503_and_a_disconnect_stops_generation(engine):
    gated = GatedEngine(engine)
    for url in serve(create_app(gated, MODEL, max_concurrency=1, max_queue=0)):
        body = {"model": MODEL, "messages": HI, "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as held:
            assert held.status_code == 200 and gated.started.wait(5)
            busy = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
            assert error_of(busy, 503)["type"] == "server_error"
            gated.go.set()
            next(held.iter_lines())
        assert gated.closed.wait(5)  # the client went away: the worker stopped iterating
        deadline = time.monotonic() + 5  # and its slot came back
        while (r := httpx.post(f"{url}/v1/completions", json={**body, "prompt": "hi", "max_tokens": 2,
                                                             "stream": False})).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json()["choices"][0]["text"] == "ee"


def test_page_has_csp_no_inline_script_and_renders_text_safely(url):
    page = httpx.get(url)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son\w+=", page.text)  # no inline event handlers either
    js = httpx.get(f"{url}/static/app.js")
    assert js.status_code == 200 and "textContent" in js.text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", js.text)
    assert httpx.get(f"{url}/static/app.css").status_code == 200


def test_run_server_warns_on_an_open_host_without_a_key(engine, monkeypatch, capsys):
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(kw))
    monkeypatch.setattr("gptlab.weights.load.load_checkpoint", lambda name, device: engine)
    monkeypatch.setattr(serve_app, "Engine", lambda ckpt, device, **options: ckpt)
    serve_app.run_server("some/run", host="0.0.0.0", port=9999, device="cpu")
    assert "without --api-key" in capsys.readouterr().err and ran == {"host": "0.0.0.0", "port": 9999,
                                                                       "log_level": "warning"}
    serve_app.run_server("some/run", host="127.0.0.1", api_key=None, device="cpu")
    assert "warning" not in capsys.readouterr().err


def test_sse_body_shape(url):
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"model": MODEL, "messages": HI, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_slot_is_free_before_its_response_ends_even_when_the_loop_closes_at_once(engine, monkeypatch):
    """FastAPI's test client runs each request in an event loop of its own, closed as soon as the
    response ends. The worker's last callback is made to arrive late, as it does when the worker
    thread is preempted on a loaded machine: freeing the slot in a callback of its own, after the
    end marker, lost that callback to the closed loop, and the next request waited forever."""
    from fastapi.testclient import TestClient

    from gptlab.serve.generation import Generation

    real_work = Generation._work

    class LateFinish:  # the running loop, whose thread-safe callbacks other than pieces arrive late
        def __init__(self, loop):
            self.loop = loop

        def call_soon_threadsafe(self, callback, *args):
            if getattr(callback, "__name__", "") in ("_finish", "_release"):
                threading.Timer(0.3, self.loop.call_soon_threadsafe, (callback, *args)).start()
            else:
                self.loop.call_soon_threadsafe(callback, *args)

    monkeypatch.setattr(Generation, "_work", lambda self, loop, queue: real_work(self, LateFinish(loop), queue))
    client = TestClient(create_app(engine, MODEL, max_concurrency=1))
    body = {"model": MODEL, "messages": HI, "max_tokens": 3, "temperature": 0}
    for _ in range(2):  # the second request needs the slot the first one held
        answered = []  # in a daemon thread, so that a request left waiting fails the test instead of hanging it
        asker = threading.Thread(target=lambda: answered.append(client.post("/v1/chat/completions", json=body)),
                                 daemon=True)
        asker.start()
        asker.join(timeout=30)
        assert answered and answered[0].status_code == 200, "the request waited for a slot that was never freed"
