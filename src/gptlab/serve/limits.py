"""What one request may ask of the server (``Limits``, README "Limits"), and the reading of a
request that holds it to them and to OpenAI's ranges, each failure a 4xx ``APIError``.

The body is counted as it arrives and refused with 413 once too long, before any JSON parsing,
whether or not it announced its length.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, fields
from typing import Any

from fastapi import Request

from gptlab.errors import Problems, Settings, flag
from gptlab.inference.engine import SamplingParams
from gptlab.serve.api_error import APIError

ROLES = ("system", "user", "assistant")
#: stop strings: how many, and how long each (the engine checks every prefix of each after every token)
MAX_STOPS, MAX_STOP_CHARS = 4, 256


@dataclass(frozen=True)
class Limits(Settings):
    """What one request may ask of the server; beyond it, a 4xx error in OpenAI's shape."""

    WHAT = "server limits"

    #: bytes of request body, counted as they arrive (413 ``request_too_large``)
    max_body_bytes: int = 1 << 20
    #: entries in a chat request's ``messages`` (400 ``array_above_max_length``)
    max_messages: int = 256
    #: characters of input: all message contents together, or a completion's prompt (400
    #: ``string_above_max_length``). This bounds the tokenizing work done before the
    #: context-window check; the prompt must also fit the window (400 ``context_length_exceeded``).
    max_input_chars: int = 100_000
    #: the largest ``max_tokens``, so one request cannot hold a slot for hours (400)
    max_tokens: int = 4096

    def __post_init__(self) -> None:  # frozen, so checked once, when made; named as gptlab serve's flags
        self.validate(flag)

    def _check(self, p: Problems) -> None:
        p.whole(*(f.name for f in fields(self)))


async def read_body(request: Request, limits: Limits, model_name: str) -> dict:
    """The request's JSON object, which must name ``model_name`` as its ``model``."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limits.max_body_bytes} "
                              "bytes", code="request_too_large")
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limits.max_body_bytes:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():  # counted as it arrives, so a chunked body is bounded too
        raw += chunk
        if len(raw) > limits.max_body_bytes:
            raise too_large
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "model is required (a string)", param="model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server has {model_name!r}",
                       param="model", code="model_not_found")
    return body


def _number(body: dict, name: str, default: float | None, low: float, high: float, *,
            integer: bool = False, low_open: bool = False) -> Any:
    """``body[name]`` checked to lie in [low, high] ((low, high] with ``low_open``)."""
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    in_range = (isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
                and (value > low if low_open else value >= low) and value <= high)
    if not in_range:
        what = "an integer" if integer else "a number"
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name}={value!r} must be {what} in {bounds}", param=name)
    return value


def read_sampling(body: dict, default_max_tokens: int, limits: Limits) -> SamplingParams:
    """The request's sampling settings; ``max_tokens`` defaults to ``default_max_tokens``."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                                  and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise APIError(400, f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of up to "
                            f"{MAX_STOPS} of them", param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise APIError(400, f"seed={seed!r} must be a non-negative integer", param="seed")
    if body.get("n", 1) != 1:
        raise APIError(400, f"n={body['n']!r} is not supported: this server returns one choice (n=1)", param="n")
    top_p = _number(body, "top_p", None, 0, 1, low_open=True)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=None if top_p == 1 else top_p,  # 1 keeps every token: no filtering to do
        top_k=_number(body, "top_k", None, 1, sys.maxsize, integer=True),
        min_p=_number(body, "min_p", None, 0, 1),
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", min(default_max_tokens, limits.max_tokens),
                               1, limits.max_tokens, integer=True),
        seed=seed, stop=tuple(stops or ()))


def read_messages(body: dict, limits: Limits) -> list[dict[str, str]]:
    """A chat request's ``messages``, each reduced to its role and content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"messages has {len(messages)} entries, more than this server's limit of "
                            f"{limits.max_messages}; drop old messages", param="messages",
                       code="array_above_max_length")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        if not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
    _check_input_chars(sum(len(m["content"]) for m in messages), "messages", limits)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_prompt(body: dict, limits: Limits) -> str:
    """A completion request's one ``prompt``."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # clients often send one prompt as a list
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
    _check_input_chars(len(prompt), "prompt", limits)
    return prompt


def _check_input_chars(n: int, param: str, limits: Limits) -> None:
    if n > limits.max_input_chars:
        raise APIError(400, f"{param} holds {n} characters, more than this server's limit of "
                            f"{limits.max_input_chars}; shorten it", param=param, code="string_above_max_length")
