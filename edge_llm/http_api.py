"""The HTTP skin: a Starlette app over the appliance (appliance.py), beside the gRPC one.

    /v1/chat/completions, /v1/completions, /v1/models   the OpenAI-style API (SSE streaming)
    /health                                             200 serving, 503 otherwise

The appliance is blocking (threads, locks, llama.cpp): admitting a request and reading each
chunk run on worker threads, the event loop only moves bytes. A stream watches for its client's
disconnect from the moment it is admitted, queued or not, and cancels the generation then: the
engine stops within one token. Domain errors become statuses in one place (_STATUS), with
OpenAI's error object; every request is counted by the appliance while it runs, so the server
frees the model only once no request is inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.to_thread import run_sync
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_llm import openai_convert as oc
from edge_llm.appliance import Appliance, Generation
from edge_llm.types import (
    BusyError,
    Chunk,
    FinishReason,
    GenerateRequest,
    NotFoundError,
    NotReadyError,
    PreconditionError,
    QueueFullError,
    RequestError,
    SamplingDefaults,
    StorageFullError,
    TurnNotKeptError,
)

log = logging.getLogger(__name__)

# Domain errors: HTTP status, OpenAI error type, code. Anything else is a 500. Order matters:
# BusyError is a PreconditionError.
_STATUS: list[tuple[type[Exception], int, str, str]] = [
    (RequestError, 400, "invalid_request_error", "invalid_request"),
    (NotFoundError, 404, "not_found_error", "not_found"),
    (BusyError, 409, "conflict_error", "session_busy"),
    (PreconditionError, 400, "invalid_request_error", "failed_precondition"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (StorageFullError, 507, "server_error", "storage_full"),
    (NotReadyError, 503, "unavailable_error", "unavailable"),
    (TurnNotKeptError, 409, "conflict_error", "turn_not_kept"),
]
RETRY_AFTER_SECONDS = 1  # a full queue moves on within a few answers' time
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_status(e: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, OpenAI error object and headers for an exception raised by the appliance."""
    for kind, status, type_, code in _STATUS:
        if isinstance(e, kind):
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}
            return status, oc.error(str(e), type_, code), headers
    log.error("request handling failed", exc_info=e)
    return 500, oc.error(f"could not process the request: {e}", "server_error", "internal"), {}


def _error_response(e: Exception) -> JSONResponse:
    status, body, headers = error_status(e)
    return JSONResponse(body, status, headers)


async def _domain_error(_: Request, e: Exception) -> Response:
    return _error_response(e)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    kind, message = "invalid_request_error", e.detail
    if e.status_code == 404:
        kind = "not_found_error"
        message = (
            f"nothing at {request.url.path}: the page is at /, the OpenAI-style API at "
            "/v1/chat/completions, /v1/completions and /v1/models"
        )
    elif e.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse(oc.error(message, kind, str(e.status_code)), e.status_code, e.headers)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read up to `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise HTTPException(413, f"the request body is over the {limit}-byte limit")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError("the request body must be a JSON object")
    return value


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


class _Stream(Response):
    """Server-sent events from a generation: `render` turns each chunk into events. The
    client's disconnect cancels the generation at once, queued or running; an error once the
    stream has begun is sent as an OpenAI error event (the SDKs raise it)."""

    def __init__(self, generation: Generation, render: Callable[[Chunk], list[bytes]]) -> None:
        self.status_code, self.media_type, self.background = 200, "text/event-stream", None
        self.init_headers(_SSE_HEADERS)  # no body: no Content-Length
        self.generation, self._events = generation, render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}

        async def body(events: list[bytes]) -> None:
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})

        async def pump(chunks: Iterator[Chunk]) -> None:
            await send(start)
            try:
                async for chunk in _in_threads(chunks):
                    await body(self._events(chunk))
            except Exception as e:  # raised by the appliance mid-stream
                await body([_event(error_status(e)[1]), _DONE])
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        with contextlib.suppress(OSError):  # the client went away as we wrote
            await _watching(receive, self.generation, pump)


async def _watching(
    receive: Receive, generation: Generation, work: Callable[[Iterator[Chunk]], Awaitable[None]]
) -> None:
    """Run `work` on the generation's chunks while watching for the client's disconnect, which
    cancels the generation; afterwards the generation is over either way."""

    async def cancel_on_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        generation.cancel()

    chunks: Generator[Chunk] = generation.chunks()
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cancel_on_disconnect)
            await work(chunks)
            tasks.cancel_scope.cancel()
    finally:
        generation.cancel()  # a no-op once it finished
        await run_sync(chunks.close)  # frees its session claim now, not at garbage collection


async def _in_threads(chunks: Iterator[Chunk]) -> Any:
    """The chunks of a blocking iterator, each waited for on a worker thread."""
    done = object()
    while (chunk := await run_sync(next, chunks, done)) is not done:
        yield chunk


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


_DONE = b"data: [DONE]\n\n"


def _cut_off(chunk: Chunk) -> Exception | None:
    """A chunk that ends the answer without it being finished: the server cut it off."""
    if chunk.finish_reason is FinishReason.CANCELLED:
        return NotReadyError(chunk.notice or "the answer was cancelled")
    return None


class OpenAIRoutes:
    """The OpenAI-style routes over one appliance."""

    def __init__(self, core: Appliance) -> None:
        self.core = core

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
        ]

    async def _admit(
        self,
        request: Request,
        build: Callable[[SamplingDefaults | None], GenerateRequest],
        session_id: str | None,
    ) -> Generation:
        peer = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
        return await run_sync(self.core.generate, build, session_id, peer)

    async def chat_completions(self, request: Request) -> Response:
        limits = self.core.limits
        body = await _json_body(request, limits.max_request_bytes)
        session_id = oc.session_id(body)
        include_usage = oc.stream_options(body)
        generation = await self._admit(
            request, lambda defaults: oc.chat_request(body, limits, defaults), session_id
        )
        ids = oc.Ids("chat", self._model_name())
        if body.get("stream") is True:
            return _Stream(generation, self._chat_events(ids, generation, include_usage))
        text, last = await self._collect(request, generation)
        return JSONResponse(oc.chat_completion(ids, text, last, generation.session_id))

    def _chat_events(
        self, ids: oc.Ids, generation: Generation, include_usage: bool
    ) -> Callable[[Chunk], list[bytes]]:
        first = True

        def render(chunk: Chunk) -> list[bytes]:
            nonlocal first
            if (cut := _cut_off(chunk)) is not None:
                return [_event(error_status(cut)[1]), _DONE]
            events = []
            if first:  # OpenAI's first chunk carries the role
                events.append(_event(oc.chat_chunk(ids, {"role": "assistant", "content": ""})))
                first = False
            if chunk.text:
                events.append(_event(oc.chat_chunk(ids, {"content": chunk.text})))
            if chunk.finish_reason is not None:
                last = oc.chat_chunk(ids, {}, chunk)
                last.update(oc.extensions(chunk, generation.session_id))
                events.append(_event(last))
                if include_usage:
                    events.append(_event(oc.usage_chunk(ids, "chat", chunk)))
                events.append(_DONE)
            return events

        return render

    async def completions(self, request: Request) -> Response:
        limits = self.core.limits
        body = await _json_body(request, limits.max_request_bytes)
        include_usage = oc.stream_options(body)
        generation = await self._admit(request, lambda _: oc.completion_request(body, limits), None)
        ids = oc.Ids("completion", self._model_name())
        if body.get("stream") is True:

            def render(chunk: Chunk) -> list[bytes]:
                if (cut := _cut_off(chunk)) is not None:
                    return [_event(error_status(cut)[1]), _DONE]
                if chunk.finish_reason is None:
                    return [_event(oc.completion_chunk(ids, chunk.text))]
                last = oc.completion_chunk(ids, chunk.text, chunk)
                last.update(oc.extensions(chunk, None))
                events = [_event(last)]
                if include_usage:
                    events.append(_event(oc.usage_chunk(ids, "completion", chunk)))
                return [*events, _DONE]

            return _Stream(generation, render)
        text, last = await self._collect(request, generation)
        return JSONResponse(oc.text_completion(ids, text, last))

    async def _collect(self, request: Request, generation: Generation) -> tuple[str, Chunk]:
        """A whole answer, for a request that did not ask to stream (a client that leaves
        cancels it all the same); a server cut-off is a 503."""
        parts: list[str] = []
        last = Chunk("")

        async def collect(chunks: Iterator[Chunk]) -> None:
            nonlocal last
            async for last in _in_threads(chunks):
                parts.append(last.text)

        await _watching(request.receive, generation, collect)
        if (cut := _cut_off(last)) is not None:
            raise cut
        return "".join(parts), last

    def _model_name(self) -> str:
        return model_id(self.core)

    async def models(self, request: Request) -> Response:
        created = int(self.core.ready().started_at)
        return JSONResponse(
            {"object": "list", "data": [oc.model_object(model_id(self.core), created)]}
        )

    async def model(self, request: Request) -> Response:
        name, served = request.path_params["model"], model_id(self.core)
        if name != served:
            raise NotFoundError(f"no model {name!r}; this server serves {served!r}")
        return JSONResponse(oc.model_object(name, int(self.core.ready().started_at)))


def model_id(core: Appliance) -> str:
    """The served model's id: its file name without .gguf (names the model and its
    quantization, and has no spaces, unlike the GGUF's own name). Requests may name any
    model: there is one."""
    return Path(core.ready().model.path).name.removesuffix(".gguf")


def build_app(core: Appliance, serving: Callable[[], bool]) -> ASGIApp:
    """The whole HTTP side. `serving`: the same truth as grpc.health.v1's overall status."""

    async def health(request: Request) -> Response:
        ok = serving()
        return JSONResponse({"status": "serving" if ok else "not_serving"}, 200 if ok else 503)

    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        kind: _domain_error for kind, *_ in _STATUS
    }
    handlers[HTTPException] = _http_error
    handlers[Exception] = _domain_error  # a 500 with an error object, and a logged trace
    app = Starlette(
        routes=[*OpenAIRoutes(core).routes(), Route("/health", health, methods=["GET"])],
        exception_handlers=handlers,
    )
    return _Counted(app, core)
