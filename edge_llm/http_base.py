"""What every HTTP route shares: domain errors as statuses with OpenAI's error object (one
table, for the API and the page alike), reading a bounded JSON body, and a generation's chunks
read on worker threads while the client's disconnect is watched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import anyio
from anyio.to_thread import run_sync
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from edge_llm import openai_convert as oc
from edge_llm.appliance import Generation
from edge_llm.types import (
    BusyError,
    Chunk,
    FinishReason,
    NotFoundError,
    NotReadyError,
    PreconditionError,
    QueueFullError,
    RequestError,
    StorageFullError,
    TurnNotKeptError,
    UnauthenticatedError,
)

log = logging.getLogger(__name__)

# Domain errors: HTTP status, OpenAI error type, code. Anything else is a 500. Order matters:
# BusyError is a PreconditionError.
STATUS: list[tuple[type[Exception], int, str, str]] = [
    (RequestError, 400, "invalid_request_error", "invalid_request"),
    (NotFoundError, 404, "not_found_error", "not_found"),
    (BusyError, 409, "conflict_error", "session_busy"),
    (PreconditionError, 400, "invalid_request_error", "failed_precondition"),
    (QueueFullError, 429, "rate_limit_error", "queue_full"),
    (StorageFullError, 507, "server_error", "storage_full"),
    (NotReadyError, 503, "unavailable_error", "unavailable"),
    (TurnNotKeptError, 409, "conflict_error", "turn_not_kept"),
    (UnauthenticatedError, 401, "invalid_request_error", "invalid_api_key"),  # OpenAI's own
]
RETRY_AFTER_SECONDS = 1  # a full queue moves on within a few answers' time


def owner(connection: HTTPConnection) -> str:
    """Whose sessions the request may see: the caller the app's token check found ("" when
    the server asks for no tokens)."""
    caller = connection.scope.get("state", {}).get("caller")
    return "" if caller is None else str(caller.name)


def error_status(e: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, OpenAI error object and headers for an exception raised by the appliance."""
    for kind, status, type_, code in STATUS:
        if isinstance(e, kind):
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}
            return status, oc.error(str(e), type_, code), headers
    log.error("request handling failed", exc_info=e)
    return 500, oc.error(f"could not process the request: {e}", "server_error", "internal"), {}


async def domain_error(_: Request, e: Exception) -> Response:
    """Starlette's exception handler for the appliance's errors (and any other: a 500)."""
    status, body, headers = error_status(e)
    return JSONResponse(body, status, headers)


async def http_error(request: Request, e: Exception) -> Response:
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


async def json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read up to `limit` bytes. It must say it is JSON: a form
    or text/plain POST is what another web site can make a browser send unasked (CSRF), and
    JSON cannot be sent cross-site without a CORS preflight, which this server never grants."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise HTTPException(
            415,
            f"the body must be JSON, sent with Content-Type: application/json (got "
            f"{kind or 'none'}); with curl add -H 'Content-Type: application/json'",
        )
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
    except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError("the request body must be a JSON object")
    return value


async def watching(
    receive: Receive, generation: Generation, work: Callable[[Iterator[Chunk]], Awaitable[None]]
) -> None:
    """Run `work` on the generation's chunks while watching for the client's disconnect, which
    cancels the generation; afterwards the generation is over either way."""

    async def cancel_on_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        generation.cancel()

    chunks: Generator[Chunk] = generation.chunks()
    error: Exception | None = None
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cancel_on_disconnect)
            try:
                await work(chunks)
            except Exception as e:  # raised as itself below, not as a task group's ExceptionGroup
                error = e
            tasks.cancel_scope.cancel()
    finally:
        await finish(generation, chunks)
    if error is not None:
        raise error


async def finish(generation: Generation, chunks: Generator[Chunk]) -> None:
    """End a generation whatever happened: cancelled if it still runs (a no-op once it
    finished), its chunks closed, which frees its session claim now, not at garbage
    collection; shielded, as it often runs in a task being cancelled."""
    generation.cancel()
    with anyio.CancelScope(shield=True):
        await run_sync(chunks.close)


async def in_threads(chunks: Iterator[Chunk]) -> AsyncIterator[Chunk]:
    """The chunks of a blocking iterator, each waited for on a worker thread."""
    while (chunk := await run_sync(next, chunks, None)) is not None:
        yield chunk


def cut_off(chunk: Chunk) -> Exception | None:
    """A last chunk that ends an unfinished answer: the server cut it off (shutting down)."""
    if chunk.finish_reason is FinishReason.CANCELLED:
        return NotReadyError(chunk.notice or "the answer was cancelled")
    return None
