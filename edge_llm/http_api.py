"""The HTTP side: one Starlette app over the appliance (appliance.py), beside the gRPC skin.

    /                                                   the chat page (page_api.py)
    /api/...                                            its sessions API and WebSocket
    /v1/chat/completions, /v1/completions, /v1/models   the OpenAI-style API (openai_api.py)
    /health                                             200 serving, 503 otherwise
    /metrics                                            Prometheus text (metrics.py)

The appliance is blocking (threads, locks, llama.cpp): admitting a request and reading each
chunk run on worker threads, the event loop only moves bytes. Every request is counted by the
appliance while it runs, so the server frees the model only once no request is inside it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from anyio.to_thread import run_sync
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_llm.appliance import Appliance
from edge_llm.http_base import STATUS, domain_error, http_error
from edge_llm.openai_api import OpenAIRoutes
from edge_llm.page_api import PageRoutes, page


class _Counted:
    """ASGI middleware: the appliance counts every HTTP request while it runs (a WebSocket
    counts each of its generations instead: an open page is not a running call)."""

    def __init__(self, app: ASGIApp, core: Appliance) -> None:
        self.app, self.core = app, core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.core.call():
            await self.app(scope, receive, send)


def build_app(core: Appliance, serving: Callable[[], bool]) -> ASGIApp:
    """The whole HTTP side. `serving`: the same truth as grpc.health.v1's overall status."""

    async def health(request: Request) -> Response:
        ok = serving()
        return JSONResponse({"status": "serving" if ok else "not_serving"}, 200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(await run_sync(core.metrics.exposition), media_type=CONTENT_TYPE_LATEST)

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        kind: domain_error for kind, *_ in STATUS
    }
    handlers[HTTPException] = http_error
    handlers[Exception] = domain_error  # a 500 with an error object, and a logged trace
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Mount("/v1", routes=OpenAIRoutes(core).routes()),
            Mount("/api", routes=PageRoutes(core).routes()),
            Mount("/", page()),  # last: the page's files answer every other path
        ],
        exception_handlers=handlers,
    )
    return _Counted(app, core)
