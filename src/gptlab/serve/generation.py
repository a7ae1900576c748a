"""Admission and the running of generations: the ``Gate`` admits requests and holds the running
slots, and each admitted request's ``Generation`` runs the engine in a worker thread.

The engine is synchronous, so each generation iterates it in a worker thread that hands text
pieces to the request's coroutine through an ``asyncio.Queue``. A semaphore lets
``max_concurrency`` generations run at once; up to ``max_queue`` more wait their turn and any
beyond that get 503 at once, so a burst cannot pile up unbounded work. A client that disconnects
stops its generation: the worker checks a flag between pieces. At shutdown the gate admits
nothing more and stops what still runs or waits once the grace period is over.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gptlab.errors import UserError
from gptlab.inference.engine import Completion, Engine, SamplingParams
from gptlab.serve.api_error import APIError, shutting_down

_END = object()  # the worker's "no more pieces" marker


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
            raise shutting_down("the server is shutting down; retry shortly")
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
            raise shutting_down("the server shut down before this request's turn came")
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
            raise shutting_down("the server shut down before the answer was finished")

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
            hand(self._finish, queue)

    def _finish(self, queue: asyncio.Queue[object]) -> None:
        # One callback frees the slot and ends the pieces, so the slot is free before the response
        # can end. As two callbacks, a response could end on the end marker and its event loop
        # close (FastAPI's test client runs each request in a loop of its own) before the second
        # ran: the slot stayed taken and the next request waited for it forever.
        self._release()
        queue.put_nowait(_END)

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
