"""The web page and the OpenAI-compatible API (FastAPI) in front of one ``Engine``.

Routes: ``GET /`` (the chat page), ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream`` true or false).

How a request runs: the engine is synchronous, so each generation iterates it in a worker
thread that hands text pieces to the request's coroutine through an ``asyncio.Queue``. A
semaphore lets ``max_concurrency`` generations run at once; up to ``max_queue`` more wait their
turn and any beyond that get 503 at once, so a burst cannot pile up unbounded work. A client that
disconnects stops its generation: the worker checks a flag between pieces.

What one request may ask is bounded by ``Limits`` (README, "Limits"): the body is counted as it
arrives and refused with 413 once too long, before any JSON parsing, whether or not it announced
its length. Rendering and tokenizing a prompt runs in a thread, so a long one does not hold up the
streams of others.

Shutdown: on SIGINT or SIGTERM uvicorn stops accepting connections and waits for open responses.
The app then admits nothing more (503) and gives running and waiting generations
``shutdown_grace`` seconds to finish; after that it stops them, and each ends its response
properly with a 503 error (in-band for a stream), so the process exits within the grace period.
A second signal stops them at once.

Token counts are exact: ``prompt_tokens`` counts the prompt's ids, and ``completion_tokens`` the
ids the model generated, which ``Engine.stream`` returns in its ``Completion`` when it ends (EOS and
the tokens of a stop string included: they were generated, though not shown). ``finish_reason``
is the engine's too: ``"stop"`` for EOS or a stop string, ``"length"`` when ``max_tokens`` ran out.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gptlab.errors import UserError
from gptlab.inference.engine import Completion, Engine, SamplingParams

STATIC = Path(__file__).parent / "static"
#: the page loads only its own script, style and API; nothing inline, no framing
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ROLES = ("system", "user", "assistant")
#: stop strings: how many, and how long each (the engine checks every prefix of each after every token)
MAX_STOPS, MAX_STOP_CHARS = 4, 256
_END = object()  # the worker's "no more pieces" marker


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server; beyond it, a 4xx error in OpenAI's shape."""

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

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
               if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1]
        if bad:
            raise UserError(f"server limits must be positive integers: {', '.join(bad)}")


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _shutting_down(message: str) -> APIError:
    return APIError(503, message, code="server_shutdown", type_="server_error")


class Gate:
    """Admission (running + waiting <= max_concurrency + max_queue), the running slots, and
    the drain at shutdown."""

    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1 or max_queue < 0:
            raise UserError(f"max_concurrency={max_concurrency} must be >= 1 and max_queue={max_queue} >= 0")
        self.slots = asyncio.Semaphore(max_concurrency)
        self.limit = max_concurrency + max_queue
        self.live: set[Generation] = set()  # admitted and not finished: running or waiting for a slot
        self.closing = False
        self.drain: asyncio.Task | None = None

    def admit(self, generation: Generation) -> None:
        if self.closing:
            raise _shutting_down("the server is shutting down; retry shortly")
        if len(self.live) >= self.limit:
            raise APIError(503, f"the server is busy ({self.limit} requests running or waiting); retry shortly",
                           code="server_busy", type_="server_error")
        self.live.add(generation)

    def close(self, grace: float) -> None:
        """Admit nothing more, and stop whatever still runs or waits ``grace`` seconds from now;
        called again (a second Ctrl-C), stop it all at once."""
        if self.closing:
            self._stop_all()
        else:
            self.closing = True
            self.drain = asyncio.get_running_loop().create_task(self._stop_after(grace))  # kept: tasks are weakly held

    async def _stop_after(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop_all()

    def _stop_all(self) -> None:
        for generation in list(self.live):
            generation.stop.set()


class Generation:
    """One request's run of the engine in a worker thread, read as an async stream of pieces.

    ``close()`` must always be called (the responses do it in ``finally``): it stops the worker
    and, when no worker ever started, gives back the admission at once. ``stop`` set while the
    pieces are still read (the drain at shutdown) ends them with a 503 ``APIError``."""

    def __init__(self, engine: Engine, gate: Gate, prompt_ids: list[int], params: SamplingParams):
        self.engine, self.gate, self.prompt_ids, self.params = engine, gate, prompt_ids, params
        self.stop = threading.Event()
        self.started = False
        self.text = ""
        self.completion: Completion | None = None  # set by the worker when the engine finishes
        gate.admit(self)

    async def pieces(self) -> AsyncIterator[str]:
        await self.gate.slots.acquire()
        self.started = True
        if self.stop.is_set():  # stopped by the drain while it waited for a slot
            self._release()
            raise _shutting_down("the server shut down before this request's turn came")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        # Not a daemon: at exit Python waits for it (one engine step once stopped) rather than
        # freezing it inside torch, which can abort the process.
        threading.Thread(target=self._work, args=(loop, queue)).start()
        # Read to the end marker even when stopped: the response ends only once its worker has.
        while (item := await queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            self.text += item
            yield item
        if self.completion is None:  # the worker was stopped before the engine finished
            raise _shutting_down("the server shut down before the answer was finished")

    def _work(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[object]) -> None:
        def hand(callback: Callable[..., object], *args: object) -> None:
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop closed under this thread (a forced quit): no one is waiting
                self.stop.set()

        try:
            pieces = self.engine.stream(self.prompt_ids, self.params)
            while not self.stop.is_set():
                try:
                    piece = next(pieces)
                except StopIteration as done:  # the generator's return value: the Completion
                    self.completion = done.value
                    break
                hand(queue.put_nowait, piece)
            pieces.close()
        except Exception as e:  # handed to the request, which answers with it
            hand(queue.put_nowait, e)
        finally:
            hand(queue.put_nowait, _END)
            hand(self._release)

    def _release(self) -> None:
        self.gate.slots.release()
        self.gate.live.discard(self)

    def close(self) -> None:
        self.stop.set()
        if not self.started:
            self.gate.live.discard(self)

    def usage(self) -> dict[str, int]:
        completion = len(self.completion.token_ids)
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_ids) + completion}

    def finish_reason(self) -> str:
        return self.completion.finish_reason


class GenerationStream(StreamingResponse):
    """Server-sent events that close their generation however the response ends (done,
    client gone before or during the stream, error)."""

    def __init__(self, generation: Generation, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()


# --- request checking ---------------------------------------------------------------------------

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


def _sampling(body: dict, default_max_tokens: int, limits: Limits) -> SamplingParams:
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


def _messages(body: dict, limits: Limits) -> list[dict[str, str]]:
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


def _prompt(body: dict, limits: Limits) -> str:
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


# --- the app ------------------------------------------------------------------------------------

def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_concurrency: int = 1,
               max_queue: int = 8, limits: Limits = Limits(), shutdown_grace: float = 5.0) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``api_key`` guards /v1/*.

    Run in the main thread (as ``gptlab serve`` does), it drains on SIGINT and SIGTERM: see the
    module's docstring."""
    if not (isinstance(shutdown_grace, (int, float)) and 0 <= shutdown_grace < math.inf):
        raise UserError(f"shutdown_grace={shutdown_grace!r} must be a number of seconds >= 0")
    gate = Gate(max_concurrency, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        # The handler runs between two bytecodes of the loop's own thread, perhaps inside its
        # select(): call_soon_threadsafe both schedules the drain and wakes the loop.
        restore = _before_exit_signals(lambda: loop.call_soon_threadsafe(gate.close, shutdown_grace))
        try:
            yield
        finally:
            restore()

    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
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

    async def respond(body: dict, prompt_ids: list[int], params: SamplingParams, kind: str,
                      piece_choice: Callable[[str], dict],
                      final_choice: Callable[[str, str], dict]) -> dict | GenerationStream:
        """The answer, whole or as server-sent events, in OpenAI's shape for ``kind``."""
        try:
            params.check()
        except UserError as e:
            raise APIError(400, str(e)) from None
        head = {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": model_name}
        generation = Generation(engine, gate, prompt_ids, params)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            return GenerationStream(generation, _events(generation, head, kind, piece_choice, final_choice,
                                                        include_usage=bool(options.get("include_usage"))))
        return await _whole(generation, head, kind, final_choice)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "gptlab"}]}

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> dict | GenerationStream:
        body = await read_body(request)
        messages = _messages(body, limits)
        params = _sampling(body, default_max_tokens=256, limits=limits)
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
        return await respond(
            body, prompt.ids, params, "chat.completion",
            piece_choice=lambda text: {"index": 0, "delta": {"content": text}, "finish_reason": None},
            final_choice=lambda text, reason: {"index": 0, "message": {"role": "assistant", "content": text},
                                               "finish_reason": reason, "logprobs": None})

    @v1.post("/completions", response_model=None)
    async def completions(request: Request) -> dict | GenerationStream:
        body = await read_body(request)
        text = _prompt(body, limits)
        params = _sampling(body, default_max_tokens=16, limits=limits)  # OpenAI's default for this endpoint
        try:
            ids = await asyncio.to_thread(engine.tokenizer.encode, text)
        except UserError as e:
            raise APIError(400, str(e), param="prompt") from None
        if len(ids) > engine.block_size:
            raise APIError(400, f"the prompt is {len(ids)} tokens, longer than the model's {engine.block_size}-token "
                                "context window", param="prompt", code="context_length_exceeded")
        return await respond(
            body, ids, params, "text_completion",
            piece_choice=lambda piece: {"index": 0, "text": piece, "finish_reason": None, "logprobs": None},
            final_choice=lambda whole, reason: {"index": 0, "text": whole, "finish_reason": reason,
                                                "logprobs": None})

    app.include_router(v1)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                            "X-Content-Type-Options": "nosniff"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


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


def run_server(model: str | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               device: str = "auto", limits: Limits = Limits(), max_concurrency: int = 1, max_queue: int = 8,
               shutdown_grace: float = 5.0, dtype: str = "auto", compile: bool = False,
               quantize: str | None = None) -> None:
    """Load ``model`` (default: the chat default, smollm2-135m-instruct) and serve it until
    SIGTERM or Ctrl-C, which end it gracefully (see ``create_app``) with exit status 0."""
    import uvicorn

    from gptlab.device import pick_device
    from gptlab.inference.chat import DEFAULT_CHAT_MODEL
    from gptlab.weights.load import load_checkpoint

    # After its graceful shutdown uvicorn raises the signal again, for the handler that was
    # there before it; SIGTERM's default would then kill the process as if nothing had been
    # done, so a finished shutdown exits with 0 instead (Ctrl-C's KeyboardInterrupt uvicorn
    # swallows itself). Until uvicorn runs, SIGTERM simply ends the loading quietly.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        name = model or DEFAULT_CHAT_MODEL
        dev = pick_device(device)
        engine = Engine(load_checkpoint(name, device=dev), device=dev, dtype=dtype, compile=compile,
                        quantize=quantize)
        app = create_app(engine, Path(name).name or name, api_key=api_key, max_concurrency=max_concurrency,
                         max_queue=max_queue, limits=limits, shutdown_grace=shutdown_grace)
        if api_key is None and not _is_loopback(host):
            print(f"warning: serving on {host} without --api-key: anyone who can reach this port can use the model",
                  file=sys.stderr)
        print(f"serving {name} at http://{host}:{port}/ (OpenAI API at /v1)", file=sys.stderr)
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _before_exit_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Have SIGINT and SIGTERM call ``callback`` first, then the handler already installed
    (under uvicorn, its graceful shutdown); return what undoes this. A signal left to its
    default or ignored has no shutdown to come before, so it is left alone; and signals reach
    only the main thread, so elsewhere (tests run servers in threads) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM) if callable(handler := signal.getsignal(sig))}

    def chained(signum: int, frame: FrameType | None) -> None:
        callback()
        previous[signum](signum, frame)

    for sig in previous:
        signal.signal(sig, chained)

    def restore() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is chained:
                signal.signal(sig, handler)

    return restore


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: we cannot know where it resolves, so warn
        return False
