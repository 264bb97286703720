"""The EdgeLLM servicer: convert -> admit -> engine -> stream.

A Generate call is validated and tokenized on its own handler thread, then waits in the
scheduler's queue for the engine; its chunks come back through the job and go out one message
per chunk. The RPC-done callback cancels the job, whether the client cancelled, went away or
passed its deadline (grpcio's context.is_active() is not reliable for that: grpc #20259).

Every handler is wrapped by @_rpc: domain errors become gRPC statuses there and only there,
and the call is counted while it runs, so the server frees the model and the session store
only once no call is inside them.

In a session (session_id set), the stored history goes before the new message, and the
finished turn is stored before its last message is sent (conversations.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from edge_llm import checks, convert
from edge_llm.admission import Gate, Job, Scheduler
from edge_llm.conversations import Conversations, Turn
from edge_llm.memory import MemoryPlan
from edge_llm.types import (
    FinishReason,
    GenerateRequest,
    ModelInfo,
    NotFoundError,
    NotReadyError,
    PreconditionError,
    QueueFullError,
    RequestError,
    RuntimeInfo,
    StorageFullError,
    TurnNotKeptError,
)
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from edge_llm.engine import Engine

log = logging.getLogger(__name__)
Handler = TypeVar("Handler", bound=Callable[..., Any])

# Domain errors and the gRPC status each one is; anything else is INTERNAL.
_STATUS: dict[type[Exception], grpc.StatusCode] = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReadyError: grpc.StatusCode.UNAVAILABLE,
    TurnNotKeptError: grpc.StatusCode.ABORTED,
}


@contextlib.contextmanager
def _statuses(context: grpc.ServicerContext) -> Iterator[None]:
    """End the call with the status of the domain error raised inside, or INTERNAL."""
    try:
        yield
    except tuple(_STATUS) as e:
        code = next(code for kind, code in _STATUS.items() if isinstance(e, kind))
        context.abort(code, str(e))
    except Exception as e:
        log.exception("request handling failed")
        context.abort(grpc.StatusCode.INTERNAL, f"could not process the request: {e}")


def _rpc(handler: Handler) -> Handler:
    """A servicer method: counted while it runs, its errors turned into statuses."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streaming(self: EdgeLLMService, request: Any, context: grpc.ServicerContext) -> Any:
            with self._calls.running(), _statuses(context):
                yield from handler(self, request, context)

        return streaming  # type: ignore[return-value]

    @functools.wraps(handler)
    def unary(self: EdgeLLMService, request: Any, context: grpc.ServicerContext) -> Any:
        with self._calls.running(), _statuses(context):
            return handler(self, request, context)

    return unary  # type: ignore[return-value]


class _Calls:
    """How many handlers are running."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._changed.notify_all()

    def wait_until_none(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


@dataclass
class Loaded:
    """What exists once the model is loaded; until then calls get UNAVAILABLE."""

    engine: Engine
    scheduler: Scheduler
    runtime: RuntimeInfo
    model: ModelInfo
    memory: MemoryPlan
    conversations: Conversations


TOKENIZERS = 2  # tokenizations at once: each is a core's worth of work the model wants too


class EdgeLLMService(pb_grpc.EdgeLLMServicer):
    def __init__(self, limits: checks.Limits, log_prompts: bool = False) -> None:
        self.limits = limits
        self.log_prompts = log_prompts  # prompts are private: logged only when asked to
        self.loaded: Loaded | None = None
        self.draining = False  # the server is stopping: new calls are refused
        self._calls = _Calls()
        # Rendering and tokenizing a prompt (Generate) or a text (Tokenize), up to 1 MiB.
        self.tokenizing = Gate(TOKENIZERS, limits.queue_depth, "tokenizations")

    @_rpc
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        received_at = time.monotonic()
        loaded = self._loaded()
        loaded.scheduler.check_room()  # a full queue refuses before any work is done
        if not request.session_id:
            req = convert.generate_request_from_pb(request, self.limits)
            with self.tokenizing.enter():
                prompt = loaded.engine.prompt_tokens(req)
            yield from self._stream(context, loaded, req, prompt, received_at)
            return
        # In a session: its history goes before the new message, and the turn is stored.
        conversations = loaded.conversations
        claim = conversations.claim(checks.session_id(request.session_id))  # busy, then read
        try:
            req = convert.generate_request_from_pb(request, self.limits, claim.session.defaults)
            with self.tokenizing.enter():
                turn = conversations.fit(claim, req)
            yield from self._stream(context, loaded, turn.request, turn.prompt, received_at, turn)
        finally:
            conversations.release(claim)

    def _stream(
        self,
        context: grpc.ServicerContext,
        loaded: Loaded,
        req: GenerateRequest,
        prompt: list[int],
        received_at: float,
        turn: Turn | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        job = Job(req, prompt, received_at=received_at, peer=context.peer())
        ended = functools.partial(_ended, job, loaded, turn)
        if not context.add_callback(ended):
            ended()
            return  # the call ended while we were tokenizing
        loaded.scheduler.submit(job)
        fields = {"REQUEST_ID": job.id, "PEER": job.peer, "PROMPT_TOKENS": len(prompt)}
        if turn is not None:
            fields["SESSION_ID"] = turn.claim.session.id
        log.info(
            "request %d queued: %d prompt tokens from %s",
            job.id,
            len(prompt),
            job.peer,
            extra=fields,
        )
        if self.log_prompts:
            text = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
            log.info("request %d prompt: %s", job.id, text, extra={**fields, "PROMPT": text})
        answer: list[str] = []
        for chunk in job.chunks():
            answer.append(chunk.text)
            if turn is not None and chunk.finish_reason not in (None, FinishReason.CANCELLED):
                # A finished turn is stored before its last message goes out.
                if not loaded.conversations.finish(turn, "".join(answer), job.cancelled.is_set):
                    raise TurnNotKeptError(
                        "the answer was cancelled as it finished, and not kept; send it again"
                    )
                chunk = replace(chunk, notice=turn.notice)
            yield convert.chunk_to_pb(chunk)

    @_rpc
    def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.ServicerContext
    ) -> pb.CreateSessionResponse:
        conversations = self._loaded().conversations
        limit = self.limits.max_text_bytes
        system_prompt = checks.size("system_prompt", request.system_prompt, limit)
        defaults = convert.sampling_defaults_from_pb(request.defaults, self.limits)
        session = conversations.create(system_prompt, defaults)
        log.info("session %s created", session.id, extra={"SESSION_ID": session.id})
        return pb.CreateSessionResponse(session=convert.session_to_pb(session))

    @_rpc
    def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.ServicerContext
    ) -> pb.GetSessionResponse:
        store = self._loaded().conversations.store
        session = store.get(checks.session_id(request.id, "id"))
        return pb.GetSessionResponse(session=convert.session_to_pb(session))

    @_rpc
    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        store = self._loaded().conversations.store
        sessions, token = store.list(checks.page_size(request.page_size), request.page_token)
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_pb(s) for s in sessions], next_page_token=token
        )

    @_rpc
    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        conversations = self._loaded().conversations
        conversations.delete(checks.session_id(request.id, "id"))
        log.info("session %s deleted", request.id, extra={"SESSION_ID": request.id})
        return pb.DeleteSessionResponse()

    @_rpc
    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        text, messages = convert.tokenize_request_from_pb(request, self.limits)
        engine = self._loaded().engine
        with self.tokenizing.enter():
            tokens = engine.tokenize(text, messages)
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens))

    @_rpc
    def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetInfoResponse:
        loaded = self._loaded()
        return convert.info_to_pb(loaded.model, loaded.runtime, self.limits, loaded.memory)

    def wait_for_calls(self, timeout: float) -> bool:
        """Wait until no handler runs (streams have sent their last message); False on
        timeout."""
        return self._calls.wait_until_none(timeout)

    def set_model_sha256(self, sha256: str) -> None:
        if self.loaded is not None:
            self.loaded.model = replace(self.loaded.model, sha256=sha256)

    def _loaded(self) -> Loaded:
        if self.draining:
            raise NotReadyError("the server is shutting down; retry on another instance")
        if self.loaded is None:
            raise NotReadyError("the model is loading; retry shortly")
        return self.loaded


def _ended(job: Job, loaded: Loaded, turn: Turn | None) -> None:
    """The RPC-done callback: the client cancelled, went away or passed its deadline, or the
    call completed (then cancelling is a no-op). A cancelled turn frees its session now, so
    the client may send its next message at once. It runs on grpc's one polling thread,
    which every call's events wait for: it must never block."""
    loaded.scheduler.cancel(job)
    if turn is not None:
        loaded.conversations.release_soon(turn.claim)
