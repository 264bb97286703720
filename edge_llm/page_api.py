"""The chat page's side of HTTP: the page itself (edge_llm/web/, offline, same-origin only),
its JSON API for sessions under /api, and the WebSocket that streams answers.

    GET    /api/info                        model, limits, version
    GET    /api/sessions                    ?page_size=&page_token=, most recently used first
    POST   /api/sessions                    {"system_prompt", "title", "defaults"}
    GET    /api/sessions/{id}               with its messages
    PATCH  /api/sessions/{id}               {"title", "system_prompt", "defaults"}, any of them
    DELETE /api/sessions/{id}
    WS     /api/chat                        the protocol is in the README

A socket runs one answer at a time; a stop frame or the socket closing cancels it (the engine
stops within one token). A socket from a page of another origin is refused: a browser sends
cookies and reaches loopback from any site it has open (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Mapping
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from anyio import create_task_group
from anyio.to_thread import run_sync
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from edge_llm import __version__, auth, checks
from edge_llm import openai_convert as oc
from edge_llm.appliance import Appliance, Generation
from edge_llm.http_base import error_status, finish, in_threads, json_body, owner
from edge_llm.types import (
    ChatMessage,
    Chunk,
    FinishReason,
    RequestError,
    SamplingDefaults,
    Session,
    SessionChanges,
    UnauthenticatedError,
)

WEB_DIR = Path(str(files("edge_llm") / "web"))
# The page loads nothing from anywhere else, and no other site may frame it.
_PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def session_json(s: Session) -> dict[str, Any]:
    defaults = {k: v for k, v in asdict(s.defaults).items() if v not in (None, ())}
    return {
        "id": s.id,
        "title": s.title,
        "system_prompt": s.system_prompt,
        "defaults": defaults,
        "messages": [{"role": m.role, "content": m.content} for m in s.messages],
        "message_count": s.message_count,
        "dropped_messages": s.dropped_messages,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    }


def _text(body: Mapping[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string")
    return checks.size(name, value, limit)


def _defaults(body: Mapping[str, Any], limits: checks.Limits) -> SamplingDefaults | None:
    value = body.get("defaults")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("defaults must be an object (temperature, max_tokens, top_p, ...)")
    return checks.sampling_defaults(oc.given_fields(value, limits), limits)


class PageRoutes:
    def __init__(self, core: Appliance) -> None:
        self.core = core

    def routes(self) -> list[Route | WebSocketRoute]:
        """Under /api."""
        return [
            Route("/info", self.info, methods=["GET"]),
            Route("/sessions", self.list_sessions, methods=["GET"]),
            Route("/sessions", self.create_session, methods=["POST"]),
            Route("/sessions/{id}", self.get_session, methods=["GET"]),
            Route("/sessions/{id}", self.update_session, methods=["PATCH"]),
            Route("/sessions/{id}", self.delete_session, methods=["DELETE"]),
            WebSocketRoute("/chat", self.chat),
        ]

    async def info(self, request: Request) -> Response:
        loaded, limits = self.core.ready(), self.core.limits
        return JSONResponse(
            {
                "model": {
                    "name": loaded.model.name,
                    "quantization": loaded.model.quantization,
                    "context_length": limits.context_length,
                },
                "limits": {
                    "max_tokens": limits.max_tokens,
                    "default_max_tokens": limits.default_max_tokens,
                    "max_message_bytes": limits.max_text_bytes,
                },
                "version": __version__,
            }
        )

    async def list_sessions(self, request: Request) -> Response:
        size = request.query_params.get("page_size", "0")
        if not size.isdigit():
            raise RequestError(f"page_size must be a whole number; got {size!r}")
        page_size = checks.page_size(int(size))
        token = request.query_params.get("page_token", "")
        listing = functools.partial(self.core.list_sessions, owner=owner(request))
        sessions, next_token = await run_sync(listing, page_size, token)
        return JSONResponse(
            {"sessions": [session_json(s) for s in sessions], "next_page_token": next_token}
        )

    async def create_session(self, request: Request) -> Response:
        limits = self.core.limits
        body = await json_body(request, limits.max_request_bytes)
        system_prompt = _text(body, "system_prompt", limits.max_text_bytes) or ""
        title = _text(body, "title", checks.MAX_TITLE_BYTES) or ""
        defaults = _defaults(body, limits) or SamplingDefaults()
        create = functools.partial(self.core.create_session, owner=owner(request))
        session = await run_sync(create, system_prompt, defaults, title)
        return JSONResponse(session_json(session))

    async def get_session(self, request: Request) -> Response:
        session_id = checks.session_id(request.path_params["id"], "id")
        get = functools.partial(self.core.get_session, owner=owner(request))
        return JSONResponse(session_json(await run_sync(get, session_id)))

    async def update_session(self, request: Request) -> Response:
        limits = self.core.limits
        session_id = checks.session_id(request.path_params["id"], "id")
        body = await json_body(request, limits.max_request_bytes)
        changes = SessionChanges(
            title=_text(body, "title", checks.MAX_TITLE_BYTES),
            system_prompt=_text(body, "system_prompt", limits.max_text_bytes),
            defaults=_defaults(body, limits),
        )
        update = functools.partial(self.core.update_session, owner=owner(request))
        session = await run_sync(update, session_id, changes)
        return JSONResponse(session_json(session))

    async def delete_session(self, request: Request) -> Response:
        session_id = checks.session_id(request.path_params["id"], "id")
        await run_sync(
            functools.partial(self.core.delete_session, owner=owner(request)), session_id
        )
        return Response(status_code=204)

    async def chat(self, websocket: WebSocket) -> None:
        if not _same_origin(websocket):
            await websocket.close(code=1008)  # before accept: the browser sees a 403
            return
        # A page that sends a token offers it as a subprotocol beside ours: choose ours, or
        # the browser fails the connection.
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(auth.WS_SUBPROTOCOL if auth.WS_SUBPROTOCOL in offered else None)
        await _ChatSocket(self.core, websocket).run()


def page() -> ASGIApp:
    """The page's files: compressed (the first load is about 115 KB gzipped, 350 KB not), with
    headers that keep the page to its own origin."""
    return _Page(GZipMiddleware(StaticFiles(directory=WEB_DIR, html=True), minimum_size=512))


def _same_origin(websocket: WebSocket) -> bool:
    """A browser always says which page opened the socket; a program need not (it is no
    browser: there is no user's session in it to hijack)."""
    origin = websocket.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == websocket.headers.get("host")


class _ChatSocket:
    """One page's socket: frames in, one answer at a time out."""

    def __init__(self, core: Appliance, websocket: WebSocket) -> None:
        self.core, self.ws = core, websocket
        self.running: Generation | None = None
        self.busy = False  # a send is being admitted or answered
        self.stop_asked = False  # a stop frame came while the send was being admitted
        self.closed = False  # the page went away
        client = websocket.client
        self.peer = f"ws:{client.host}:{client.port}" if client else "ws"
        self.owner = owner(websocket)
        # False once a reload (SIGHUP) removed the token the socket was opened with.
        self.still_authorized = websocket.scope.get("state", {}).get(
            "still_authorized", lambda: True
        )

    async def run(self) -> None:
        try:
            async with create_task_group() as tasks:
                while (frame := await self._receive()) is not None:
                    kind = frame.get("type")
                    if kind == "stop":
                        self.stop_asked = self.busy
                        if self.running is not None:
                            self.running.cancel()
                    elif kind == "send":
                        if not self.still_authorized():
                            await self._error(
                                UnauthenticatedError(
                                    "this page's token was removed from the server's tokens; "
                                    "reload the page and give a current one"
                                )
                            )
                            await self.ws.close(code=1008)
                            break
                        if self.busy:
                            await self._error(
                                RequestError(
                                    "an answer is still streaming on this socket: stop it, or "
                                    "wait for its done frame, before sending the next"
                                )
                            )
                            continue
                        self.busy = True
                        tasks.start_soon(self._turn, frame)
                    else:
                        await self._error(
                            RequestError(f'unknown frame type {kind!r}; send "send" or "stop"')
                        )
                self.closed = True  # the page went away: stop its answer, even one in admission
                if self.running is not None:
                    self.running.cancel()
        finally:
            if self.running is not None:
                self.running.cancel()

    async def _receive(self) -> dict[str, Any] | None:
        """The next frame as an object; None when the socket closed."""
        while True:
            message: Message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            try:
                frame = json.loads(text if text is not None else message.get("bytes") or b"")
            except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
                await self._error(RequestError(f"a frame must be a JSON object: {e}"))
                continue
            if isinstance(frame, dict):
                return frame
            await self._error(RequestError("a frame must be a JSON object"))

    async def _turn(self, frame: dict[str, Any]) -> None:
        """Admit, stream, and end with a done or an error frame, sent once the socket is free
        for the next send (a page sends it the moment it sees the end)."""
        last: dict[str, Any] | Exception = RuntimeError("the answer ended without a last chunk")
        with self.core.call():
            try:
                generation = await self._admit(frame)
            except Exception as e:
                self.busy = self.stop_asked = False
                await self._error(e)
                return
            self.running = generation
            if self.stop_asked or self.closed:
                generation.cancel()
            chunks = generation.chunks()
            try:
                await self._send({"type": "start", "request_id": generation.job.id})
                async for chunk in in_threads(chunks):
                    if chunk.text:
                        await self._send({"type": "delta", "text": chunk.text})
                    if chunk.finish_reason is not None:
                        last = _done(chunk)
            except Exception as e:
                last = e
            finally:
                await finish(generation, chunks)
                self.running, self.busy, self.stop_asked = None, False, False
        await (self._error(last) if isinstance(last, Exception) else self._send(last))

    async def _admit(self, frame: dict[str, Any]) -> Generation:
        limits = self.core.limits
        session_id = oc.session_id(frame)
        if session_id is None:
            raise RequestError("session_id is required: create a session first")
        content = frame.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RequestError("content must be the message's text, not empty")
        checks.size("content", content, limits.max_text_bytes)
        replace_last = frame.get("replace_last", False)
        if not isinstance(replace_last, bool):
            raise RequestError("replace_last must be true or false")
        given = oc.given_fields(frame, limits)
        user = (ChatMessage("user", content),)

        def build(defaults: SamplingDefaults | None) -> Any:
            return checks.request(None, user, given, limits, defaults, session_id)

        generate = functools.partial(self.core.generate, owner=self.owner)
        return await run_sync(generate, "page", build, session_id, self.peer, replace_last)

    async def _error(self, e: Exception) -> None:
        status, body, headers = error_status(e)
        error = body["error"]
        retry = int(headers["Retry-After"]) if "Retry-After" in headers else None
        await self._send(
            {
                "type": "error",
                "status": status,
                "code": error["code"],
                "message": error["message"],
                "retry_after": retry,
            }
        )

    async def _send(self, frame: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # the page went away: its answer is cancelled
            await self.ws.send_text(json.dumps(frame, ensure_ascii=False))


def _done(chunk: Chunk) -> dict[str, Any]:
    return {
        "type": "done",
        "finish_reason": (chunk.finish_reason or FinishReason.CANCELLED).value,
        "usage": asdict(chunk.usage) if chunk.usage else None,
        "timings": asdict(chunk.timings) if chunk.timings else None,
        "notice": chunk.notice,
        # A session's turn is kept exactly when it was not cancelled (conversations.py).
        "kept": chunk.finish_reason is not FinishReason.CANCELLED,
    }


class _Page:
    """The page's files, with headers that keep it to its own origin."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_PAGE_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
