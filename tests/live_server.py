"""A live uvicorn server in a background thread, for the tests that talk to ``gptlab serve``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


def serve(app) -> Iterator[str]:
    """Run ``app`` on a free loopback port in a thread; yield its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)
