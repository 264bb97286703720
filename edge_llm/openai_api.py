"""The OpenAI-style API: /v1/chat/completions, /v1/completions (server-sent events when
`stream` is true) and /v1/models, over the appliance. The JSON is openai_convert.py's.

A stream watches for its client's disconnect from the moment it is admitted, queued or not,
and cancels the generation then: the engine stops within one token. An error once a stream has
begun is sent as an OpenAI error event (the SDKs raise it).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from anyio.to_thread import run_sync
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from edge_llm import openai_convert as oc
from edge_llm.appliance import Appliance, Generation
from edge_llm.http_base import cut_off, error_status, in_threads, json_body, owner, watching
from edge_llm.types import Chunk, GenerateRequest, NotFoundError, SamplingDefaults

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _Stream(Response):
    """Server-sent events from a generation: `render` turns each chunk into events."""

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
                async for chunk in in_threads(chunks):
                    await body(self._events(chunk))
            except Exception as e:  # raised by the appliance mid-stream
                await body([_event(error_status(e)[1]), _DONE])
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        with contextlib.suppress(OSError):  # the client went away as we wrote
            await watching(receive, self.generation, pump)


class OpenAIRoutes:
    """The OpenAI-style routes over one appliance."""

    def __init__(self, core: Appliance) -> None:
        self.core = core

    def routes(self) -> list[Route]:
        """Under /v1."""
        return [
            Route("/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/completions", self.completions, methods=["POST"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/models/{model:path}", self.model, methods=["GET"]),
        ]

    async def _admit(
        self,
        request: Request,
        build: Callable[[SamplingDefaults | None], GenerateRequest],
        session_id: str | None,
    ) -> Generation:
        peer = f"http:{request.client.host}:{request.client.port}" if request.client else "http"
        generate = functools.partial(self.core.generate, owner=owner(request))
        return await run_sync(generate, "openai", build, session_id, peer)

    async def chat_completions(self, request: Request) -> Response:
        limits = self.core.limits
        body = await json_body(request, limits.max_request_bytes)
        session_id = oc.session_id(body)
        stream, include_usage = oc.streaming(body)
        ids = oc.Ids("chat", model_id(self.core))  # before admission: nothing to undo if it fails
        generation = await self._admit(
            request, lambda defaults: oc.chat_request(body, limits, defaults), session_id
        )
        if stream:
            return _Stream(generation, self._chat_events(ids, generation, include_usage))
        text, last = await self._collect(request, generation)
        return JSONResponse(oc.chat_completion(ids, text, last, generation.session_id))

    def _chat_events(
        self, ids: oc.Ids, generation: Generation, include_usage: bool
    ) -> Callable[[Chunk], list[bytes]]:
        first = True

        def render(chunk: Chunk) -> list[bytes]:
            nonlocal first
            if (cut := cut_off(chunk)) is not None:
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
        body = await json_body(request, limits.max_request_bytes)
        stream, include_usage = oc.streaming(body)
        ids = oc.Ids("completion", model_id(self.core))
        generation = await self._admit(request, lambda _: oc.completion_request(body, limits), None)
        if stream:

            def render(chunk: Chunk) -> list[bytes]:
                if (cut := cut_off(chunk)) is not None:
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
            async for last in in_threads(chunks):
                parts.append(last.text)

        await watching(request.receive, generation, collect)
        if (cut := cut_off(last)) is not None:
            raise cut
        return "".join(parts), last

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
