"""`gptlab serve` under load and with a real model: 16 concurrent streaming clients against a
tiny from-scratch model, and (slow) the official OpenAI client against SmolLM2-135M-Instruct."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Generator, Iterator

import httpx
import openai
import pytest
from live_server import serve
from test_serve import MODEL

from gptlab.inference.engine import Completion, Engine, SamplingParams
from gptlab.serve.app import create_app

CLIENTS, SLOTS = 16, 4


class CountingEngine:
    """The real engine, noting how many generations run at the same moment."""

    def __init__(self, engine: Engine):
        self.engine, self.tokenizer, self.block_size = engine, engine.tokenizer, engine.block_size
        self.lock = threading.Lock()
        self.running = self.peak = 0

    def chat_prompt(self, messages, max_new_tokens):
        return self.engine.chat_prompt(messages, max_new_tokens)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Generator[str, None, Completion]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return (yield from self.engine.stream(prompt_ids, params))
        finally:
            with self.lock:
                self.running -= 1


async def stream_raw(http: httpx.AsyncClient, path: str, body: dict) -> tuple[str, dict, str]:
    """POST a streaming request; return (assembled text, usage, finish_reason), checking that
    every event is ``data:`` JSON and the stream ends with ``[DONE]``."""
    async with http.stream("POST", path, json={**body, "stream": True,
                                               "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, await r.aread()
        events = [line async for line in r.aiter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    *pieces, last, usage = chunks
    assert usage["choices"] == [] and all(len(c["choices"]) == 1 for c in pieces + [last])
    text = "".join(c["choices"][0]["delta"].get("content", "") if "delta" in c["choices"][0]
                   else c["choices"][0]["text"] for c in pieces)
    return text, usage["usage"], last["choices"][0]["finish_reason"]


def test_sixteen_concurrent_streams_all_complete(engine):
    counting = CountingEngine(engine)
    # Room for all of them: SLOTS generate at once, the rest wait their turn instead of a 503.
    for url in serve(create_app(counting, MODEL, max_concurrency=SLOTS, max_queue=CLIENTS - SLOTS)):
        # Half chat, half plain completions; each client has its own seed (the model knows only
        # the characters of "User: hello\nAssistant: hi there").
        requests = [("chat/completions", {"messages": [{"role": "user", "content": "hello"}]}) if i % 2
                    else ("completions", {"prompt": "User: hello\nAssistant:"}) for i in range(CLIENTS)]
        common = {"model": MODEL, "max_tokens": 24, "temperature": 1.2}

        async def all_at_once() -> list[tuple[str, dict, str]]:
            async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=60) as http:
                return await asyncio.gather(*(stream_raw(http, path, {**common, **body, "seed": i})
                                              for i, (path, body) in enumerate(requests)))

        streamed = asyncio.run(all_at_once())
        assert 2 <= counting.peak <= SLOTS  # they overlapped, and never beyond the limit

        for i, ((path, body), (text, usage, finish)) in enumerate(zip(requests, streamed)):
            alone = httpx.post(f"{url}/v1/{path}", json={**common, **body, "seed": i}, timeout=60).json()
            choice = alone["choices"][0]
            assert text == (choice["message"]["content"] if "message" in choice else choice["text"])
            assert usage == alone["usage"] and finish == choice["finish_reason"]
        assert len({text for text, _, _ in streamed}) > CLIENTS // 2  # the seeds really differ


SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol() -> Iterator[tuple[Engine, openai.OpenAI]]:
    from gptlab.weights.load import load_checkpoint

    smol_engine = Engine(load_checkpoint(SMOL))
    for url in serve(create_app(smol_engine, SMOL)):
        yield smol_engine, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def check_usage(choice, usage, prompt_ids: list[int], text: str, engine: Engine, max_tokens: int) -> None:
    assert usage.prompt_tokens == len(prompt_ids)
    assert 0 < usage.completion_tokens <= max_tokens
    # The generated ids are the shown text's, give or take the end-of-turn token (and BPE may
    # generate a split that re-encoding the text would not make).
    assert abs(usage.completion_tokens - len(engine.tokenizer.encode(text))) <= 2
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == max_tokens


@pytest.mark.slow
def test_smollm2_chat_through_the_openai_client(smol):
    engine, client = smol
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=SMOL, messages=messages, max_tokens=30, temperature=0)
    text = whole.choices[0].message.content
    assert "Paris" in text
    check_usage(whole.choices[0], whole.usage, engine.chat_prompt(messages, 30).ids, text, engine, 30)

    chunks = list(client.chat.completions.create(model=SMOL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage == whole.usage and chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason

    follow_up = [*messages, {"role": "assistant", "content": text},
                 {"role": "user", "content": "And what is the capital of Italy?"}]
    second = client.chat.completions.create(model=SMOL, messages=follow_up, max_tokens=30, temperature=0)
    assert "Rome" in second.choices[0].message.content


@pytest.mark.slow
def test_smollm2_completions_through_the_openai_client(smol):
    engine, client = smol
    prompt = "The capital of France is"
    whole = client.completions.create(model=SMOL, prompt=prompt, max_tokens=12, temperature=0)
    text = whole.choices[0].text
    assert "Paris" in text
    check_usage(whole.choices[0], whole.usage, engine.tokenizer.encode(prompt), text, engine, 12)

    pieces = list(client.completions.create(model=SMOL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == text
    sampled = [client.completions.create(model=SMOL, prompt=prompt, max_tokens=12, temperature=0.8, seed=s)
               .choices[0].text for s in (1, 1)]
    assert sampled[0] == sampled[1] and sampled[0].strip()
