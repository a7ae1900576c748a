"""What the route handlers share: the one ``Service`` that ``create_app`` keeps on
``app.state.service``, handed to a handler by a parameter typed ``ServiceDep``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from gptlab.inference.engine import Engine
from gptlab.serve.generation import Gate
from gptlab.serve.limits import Limits


@dataclass(frozen=True)
class Service:
    """One engine served under one name, and the rules it is served by."""

    engine: Engine
    #: the model's name in the API: requests must name it, /v1/models and /health report it
    model_name: str
    #: the bearer key /v1/* requires, or None for none
    api_key: str | None
    limits: Limits
    gate: Gate
    #: seconds that running and waiting generations get to finish after SIGINT or SIGTERM
    shutdown_grace: float
    #: when the app was made (Unix seconds): the model's ``created`` in /v1/models
    created: int


async def get_service(request: Request) -> Service:
    """The FastAPI dependency that hands a handler its app's ``Service``."""
    return request.app.state.service


#: a handler's parameter of this type receives its app's ``Service``
ServiceDep = Annotated[Service, Depends(get_service)]
