"""The HTTP side: one Starlette app over the appliance (appliance.py), beside the gRPC skin.

    /                                                   the chat page (page_api.py)
    /api/...                                            its sessions API and WebSocket
    /v1/chat/completions, /v1/completions, /v1/models   the OpenAI-style API (openai_api.py)
    /health                                             200 serving, 503 otherwise
    /openapi.json                                       this API's description (OpenAPI 3.1)
    /metrics                                            Prometheus text (metrics.py)

The appliance is blocking (threads, locks, llama.cpp): admitting a request and reading each
chunk run on worker threads, the event loop only moves bytes. Every request is counted by the
appliance while it runs, so the server frees the model only once no request is inside it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

from anyio.to_thread import run_sync
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from edge_llm import auth
from edge_llm import openai_convert as oc
from edge_llm.appliance import Appliance
from edge_llm.http_base import STATUS, domain_error, error_status, http_error
from edge_llm.openai_api import OpenAIRoutes
from edge_llm.page_api import PageRoutes, page
from edge_llm.types import UnauthenticatedError

# The routes below and their bodies, for clients and for tests that fuzz from it: the API's
# shape, no data, so it needs no token.
OPENAPI = files("edge_llm").joinpath("openapi.json").read_bytes()


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


class _Authenticated:
    """ASGI middleware: the API, the page's sessions and WebSocket, and /metrics need a token
    (`Authorization: Bearer`; a page's WebSocket offers it as a subprotocol, auth.ws_token);
    /health and the page's own files (no data in them) do not. Without tokens a client
    certificate names the caller (mTLS; the ASGI TLS extension). The caller goes in the scope's
    state, for the routes."""

    PROTECTED = ("/v1/", "/api/", "/metrics")

    def __init__(self, app: ASGIApp, tokens: auth.Tokens | None) -> None:
        self.app, self.tokens = app, tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        protected = scope["path"].startswith(self.PROTECTED)
        if scope["type"] == "websocket":
            presented = auth.ws_token(scope.get("subprotocols", []))
        else:
            presented = auth.bearer(Headers(scope=scope).get("authorization"))
        try:
            tls = (scope.get("extensions") or {}).get("tls") or {}
            caller = auth.identify(
                self.tokens if protected else None, presented, tls.get("client_cert_name")
            )
        except UnauthenticatedError as e:
            if scope["type"] == "websocket":
                await WebSocket(scope, receive, send).close(code=1008)  # a 403 to the handshake
                return
            status, body, _ = error_status(e)
            headers = {"WWW-Authenticate": 'Bearer realm="edge-llm"'}
            await JSONResponse(body, status, headers)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["caller"] = caller
        if self.tokens is not None and protected:  # a socket outlives a reload: asked again
            tokens = self.tokens
            state["still_authorized"] = lambda: tokens.caller(presented) is not None
        await self.app(scope, receive, send)


class _LoopbackOnly:
    """ASGI middleware for a server on a loopback address: only requests addressed to an IP
    or to localhost. A web page can point a name of its own at 127.0.0.1 (DNS rebinding) and
    then read this server as its own origin; a request carrying such a name is refused."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host", "")
        name = urlsplit(f"//{host}").hostname or ""
        if scope["type"] in ("http", "websocket") and not _local_name(name):
            message = (
                f"this server listens on a loopback address and answers requests addressed to "
                f"127.0.0.1, [::1] or localhost, not to {name!r}"
            )
            response = JSONResponse(oc.error(message, "forbidden_error", "host_not_allowed"), 403)
            if scope["type"] == "websocket":
                await WebSocket(scope, receive, send).close(code=1008)
                return
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _local_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def build_app(
    core: Appliance,
    serving: Callable[[], bool],
    loopback: bool = True,
    tokens: auth.Tokens | None = None,
) -> ASGIApp:
    """The whole HTTP side. `serving`: the same truth as grpc.health.v1's overall status;
    `loopback`: it listens on a loopback address (only local names are answered); `tokens`:
    the tokens it asks for (None: none)."""

    async def health(request: Request) -> Response:
        ok = serving()
        return JSONResponse({"status": "serving" if ok else "not_serving"}, 200 if ok else 503)

    async def openapi(request: Request) -> Response:
        return Response(OPENAPI, media_type="application/json")

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
            Route("/openapi.json", openapi, methods=["GET"]),
            Mount("/v1", routes=OpenAIRoutes(core).routes()),
            Mount("/api", routes=PageRoutes(core).routes()),
            Mount("/", page()),  # last: the page's files answer every other path
        ],
        exception_handlers=handlers,
    )
    guarded = _Authenticated(_Counted(app, core), tokens)
    return _LoopbackOnly(guarded) if loopback else guarded
