"""OpenAI's API under /v1: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (``stream`` true or false), in OpenAI's shapes; the API key, when the
server has one, guards them all.

Rendering and tokenizing a prompt runs in a thread, so a long one does not hold up the streams of
others.

Token counts are exact: ``prompt_tokens`` counts the prompt's ids, and ``completion_tokens`` the
ids the model generated, which ``Engine.stream`` returns in its ``Completion`` when it ends (EOS and
the tokens of a stop string included: they were generated, though not shown). ``finish_reason``
is the engine's too: ``"stop"`` for EOS or a stop string, ``"length"`` when ``max_tokens`` ran out.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request

from gptlab.errors import UserError
from gptlab.inference.engine import SamplingParams
from gptlab.serve.api_error import APIError
from gptlab.serve.generation import Generation, GenerationStream
from gptlab.serve.limits import read_body, read_messages, read_prompt, read_sampling
from gptlab.serve.service import Service, ServiceDep


def check_key(request: Request, service: ServiceDep) -> None:
    """401 unless the request carries the server's API key (when it has one)."""
    if service.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])


@v1.get("/models")
async def models(service: ServiceDep) -> dict:
    return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                        "owned_by": "gptlab"}]}


@v1.post("/chat/completions", response_model=None)
async def chat_completions(request: Request, service: ServiceDep) -> dict | GenerationStream:
    body = await read_body(request, service.limits, service.model_name)
    messages = read_messages(body, service.limits)
    params = read_sampling(body, default_max_tokens=256, limits=service.limits)
    engine = service.engine
    try:
        prompt = await asyncio.to_thread(engine.chat_prompt, messages, params.max_new_tokens)
    except UserError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    if prompt.dropped_turns:
        # An API client expects its whole conversation to be read, so say so rather than
        # silently answer a shorter one (the terminal chat drops turns and tells the user).
        raise APIError(400, f"the conversation needs more than the model's {engine.block_size}-token context "
                            f"window with room for max_tokens={params.max_new_tokens}; drop old messages "
                            "or lower max_tokens", param="messages", code="context_length_exceeded")
    return await _respond(
        service, body, prompt.ids, params, "chat.completion",
        piece_choice=lambda text: {"index": 0, "delta": {"content": text}, "finish_reason": None},
        final_choice=lambda text, reason: {"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": reason, "logprobs": None})


@v1.post("/completions", response_model=None)
async def completions(request: Request, service: ServiceDep) -> dict | GenerationStream:
    body = await read_body(request, service.limits, service.model_name)
    text = read_prompt(body, service.limits)
    params = read_sampling(body, default_max_tokens=16, limits=service.limits)  # OpenAI's default for this endpoint
    engine = service.engine
    try:
        ids = await asyncio.to_thread(engine.tokenizer.encode, text)
    except UserError as e:
        raise APIError(400, str(e), param="prompt") from None
    if len(ids) > engine.block_size:
        raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the model's {engine.block_size}-token "
                            "context window", param="prompt", code="context_length_exceeded")
    return await _respond(
        service, body, ids, params, "text_completion",
        piece_choice=lambda piece: {"index": 0, "text": piece, "finish_reason": None, "logprobs": None},
        final_choice=lambda whole, reason: {"index": 0, "text": whole, "finish_reason": reason, "logprobs": None})


async def _respond(service: Service, body: dict, prompt_ids: list[int], params: SamplingParams, kind: str,
                   piece_choice: Callable[[str], dict],
                   final_choice: Callable[[str, str], dict]) -> dict | GenerationStream:
    """The answer, whole or as server-sent events, in OpenAI's shape for ``kind``."""
    try:
        params.check()
    except UserError as e:
        raise APIError(400, str(e)) from None
    head = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": service.model_name}
    generation = Generation(service.engine, service.gate, prompt_ids, params)
    if body.get("stream"):
        options = body.get("stream_options") or {}
        return GenerationStream(generation, _events(generation, head, kind, piece_choice, final_choice,
                                                    include_usage=bool(options.get("include_usage"))))
    return await _whole(generation, head, kind, final_choice)


async def _whole(generation: Generation, head: dict, kind: str,
                 final_choice: Callable[[str, str], dict]) -> dict:
    try:
        async for _ in generation.pieces():
            pass
    except UserError as e:
        raise APIError(400, str(e)) from None
    finally:
        generation.close()
    return {**head, "object": kind, "choices": [final_choice(generation.text, generation.finish_reason())],
            "usage": generation.usage()}


async def _events(generation: Generation, head: dict, kind: str, piece_choice: Callable[[str], dict],
                  final_choice: Callable[[str, str], dict], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: one chunk per piece, a last chunk with finish_reason, optionally a
    usage chunk, then ``[DONE]``. An error after the stream began can only be told in-band."""
    chunk = {**head, "object": f"{kind}.chunk" if kind.startswith("chat") else kind}

    def event(choices: list[dict], **extra: Any) -> str:
        return f"data: {json.dumps({**chunk, 'choices': choices, **extra})}\n\n"

    if kind.startswith("chat"):
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    try:
        async for piece in generation.pieces():
            yield event([piece_choice(piece)])
    except (UserError, APIError) as e:
        error = e if isinstance(e, APIError) else APIError(400, str(e))
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    last = final_choice("", generation.finish_reason())
    if kind.startswith("chat"):
        last = {"index": 0, "delta": {}, "finish_reason": last["finish_reason"]}
    yield event([last])
    if include_usage:
        yield event([], usage=generation.usage())
    yield "data: [DONE]\n\n"
