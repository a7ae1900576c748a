"""The web page and the OpenAI-compatible API (FastAPI) in front of one ``Engine``.

Routes: ``GET /`` (the chat page), ``GET /health``, and OpenAI's under /v1 (``openai_api``).
``create_app`` builds the app around one ``Service`` (the engine, its name and its rules) that the
handlers receive as a dependency; requests are checked against ``Limits`` (``limits``), and
admitted, queued and run by the ``Gate`` (``generation``).

Shutdown: on SIGINT or SIGTERM uvicorn stops accepting connections and waits for open responses.
The app then admits nothing more (503) and gives running and waiting generations
``shutdown_grace`` seconds to finish; after that it stops them, and each ends its response
properly with a 503 error (in-band for a stream), so the process exits within the grace period.
A second signal stops them at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from gptlab.errors import UserError
from gptlab.inference.engine import Engine
from gptlab.serve.api_error import APIError, api_error_response
from gptlab.serve.generation import Gate
from gptlab.serve.limits import Limits
from gptlab.serve.openai_api import v1
from gptlab.serve.service import Service, ServiceDep

STATIC = Path(__file__).parent / "static"
#: the page loads only its own script, style and API; nothing inline, no framing
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


site = APIRouter()  # the routes beside the API: the health check and the chat page


@site.get("/health")
async def health(service: ServiceDep) -> dict:
    return {"status": "ok", "model": service.model_name}


@site.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                        "X-Content-Type-Options": "nosniff"})


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_concurrency: int = 1,
               max_queue: int = 8, limits: Limits = Limits(), shutdown_grace: float = 5.0) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; ``api_key`` guards /v1/*.

    Run in the main thread (as ``gptlab serve`` does), it drains on SIGINT and SIGTERM: see the
    module's docstring."""
    if not (isinstance(shutdown_grace, (int, float)) and 0 <= shutdown_grace < math.inf):
        raise UserError(f"shutdown_grace={shutdown_grace!r} must be a number of seconds >= 0")
    service = Service(engine, model_name, api_key, limits, Gate(max_concurrency, max_queue), shutdown_grace,
                      created=int(time.time()))
    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.service = service
    app.add_exception_handler(APIError, api_error_response)
    app.include_router(v1)
    app.include_router(site)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service, loop = app.state.service, asyncio.get_running_loop()
    # The handler runs between two bytecodes of the loop's own thread, perhaps inside its
    # select(): call_soon_threadsafe both schedules the drain and wakes the loop.
    restore = _before_exit_signals(lambda: loop.call_soon_threadsafe(service.gate.close, service.shutdown_grace))
    try:
        yield
    finally:
        restore()


def run_server(model: str | None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               device: str = "auto", limits: Limits = Limits(), max_concurrency: int = 1, max_queue: int = 8,
               shutdown_grace: float = 5.0, dtype: str = "auto", compile: bool = False,
               quantize: str | None = None, speculate: int = 0) -> None:
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
                        quantize=quantize, speculate=speculate)
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
