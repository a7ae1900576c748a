"""Errors answered in OpenAI's shape: a status and ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down(message: str) -> APIError:
    """The 503 of a request that the shutdown refused or stopped."""
    return APIError(503, message, code="server_shutdown", type_="server_error")


async def api_error_response(request: Request, e: APIError) -> JSONResponse:
    """The app's handler for ``APIError``: its status, and its body."""
    return JSONResponse(e.body(), status_code=e.status)
