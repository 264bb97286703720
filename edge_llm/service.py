"""The EdgeLLM servicer: convert -> admit -> engine -> stream.

A Generate call is validated and tokenized on its own handler thread, then waits in the
scheduler's queue for the engine; its chunks come back through the job and go out one message
per chunk. The RPC-done callback cancels the job, whether the client cancelled, went away or
passed its deadline (grpcio's context.is_active() is not reliable for that: grpc #20259).

In a session (session_id set), the stored history goes before the new message, and the
finished turn is stored before its last message is sent (conversations.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn, TypeVar

import grpc

from edge_llm import convert
from edge_llm.admission import Job, Scheduler
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
)
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from edge_llm.engine import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Loaded:
    """What exists once the model is loaded; until then calls get UNAVAILABLE."""

    engine: Engine
    scheduler: Scheduler
    runtime: RuntimeInfo
    model: ModelInfo
    memory: MemoryPlan
    conversations: Conversations


class EdgeLLMService(pb_grpc.EdgeLLMServicer):
    def __init__(self, limits: convert.Limits, log_prompts: bool = False) -> None:
        self.limits = limits
        self.log_prompts = log_prompts  # prompts are private: logged only when asked to
        self.loaded: Loaded | None = None
        self.draining = False  # the server is stopping: new calls are refused
        self._streams: set[Job] = set()  # Generate calls not yet ended
        self._streams_changed = threading.Condition()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        received_at = time.monotonic()
        loaded = self._loaded(context)
        if not request.session_id:
            req = _checked(context, lambda: convert.generate_request_from_pb(request, self.limits))
            prompt = _checked(context, lambda: loaded.engine.prompt_tokens(req))
            yield from self._stream(context, loaded, req, prompt, received_at)
            return
        # In a session: its history goes before the new message, and the turn is stored.
        conversations = loaded.conversations
        session_id = _checked(context, lambda: convert.session_id(request.session_id))
        claim = _checked(context, lambda: conversations.claim(session_id))  # busy, then read
        try:
            req = _checked(
                context,
                lambda: convert.generate_request_from_pb(
                    request, self.limits, claim.session.defaults
                ),
            )
            turn = _checked(context, lambda: conversations.fit(claim, req))
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
        with self._streams_changed:
            self._streams.add(job)
        ended = functools.partial(self._ended, job, loaded, turn)
        if not context.add_callback(ended):
            ended()
            return  # the call ended while we were tokenizing
        _checked(context, lambda: loaded.scheduler.submit(job))
        fields = {"REQUEST_ID": job.id, "PEER": job.peer, "PROMPT_TOKENS": len(prompt)}
        if turn is not None:
            fields["SESSION_ID"] = turn.claim.session.id
        log.info("request %d queued: %d prompt tokens from %s", job.id, len(prompt), job.peer,
                 extra=fields)  # fmt: skip
        if self.log_prompts:
            text = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
            log.info("request %d prompt: %s", job.id, text, extra={**fields, "PROMPT": text})
        answer: list[str] = []
        try:
            for chunk in job.chunks():
                answer.append(chunk.text)
                if turn is not None and chunk.finish_reason not in (None, FinishReason.CANCELLED):
                    break  # a finished turn: stored below before its last message goes out
                yield convert.chunk_to_pb(chunk)
            else:
                return
        except RequestError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            log.exception("request %d failed", job.id)
            _abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {e}")
        assert turn is not None  # only a session's turn leaves the loop early
        text = "".join(answer)
        if _checked(context, lambda: loaded.conversations.finish(turn, text, job.cancelled.is_set)):
            yield convert.chunk_to_pb(replace(chunk, notice=turn.notice))
        else:  # cancelled as it finished: say so, never end OK without a last message
            _abort(context, grpc.StatusCode.ABORTED,
                   "the answer was cancelled as it finished, not kept; send it again")  # fmt: skip

    def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.ServicerContext
    ) -> pb.CreateSessionResponse:
        conversations = self._loaded(context).conversations
        system_prompt = _checked(
            context, lambda: convert.text("system_prompt", request.system_prompt, self.limits)
        )
        defaults = _checked(
            context, lambda: convert.sampling_defaults_from_pb(request.defaults, self.limits)
        )
        session = _checked(context, lambda: conversations.create(system_prompt, defaults))
        log.info("session %s created", session.id, extra={"SESSION_ID": session.id})
        return pb.CreateSessionResponse(session=convert.session_to_pb(session))

    def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.ServicerContext
    ) -> pb.GetSessionResponse:
        store = self._loaded(context).conversations.store
        session_id = _checked(context, lambda: convert.session_id(request.id, "id"))
        session = _checked(context, lambda: store.get(session_id))
        return pb.GetSessionResponse(session=convert.session_to_pb(session))

    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        store = self._loaded(context).conversations.store
        size = _checked(context, lambda: convert.page_size(request.page_size))
        sessions, token = _checked(context, lambda: store.list(size, request.page_token))
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_pb(s) for s in sessions], next_page_token=token
        )

    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        conversations = self._loaded(context).conversations
        session_id = _checked(context, lambda: convert.session_id(request.id, "id"))
        _checked(context, lambda: conversations.delete(session_id))
        log.info("session %s deleted", request.id, extra={"SESSION_ID": request.id})
        return pb.DeleteSessionResponse()

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        text, messages = _checked(
            context, lambda: convert.tokenize_request_from_pb(request, self.limits)
        )
        engine = self._loaded(context).engine
        tokens = _checked(context, lambda: engine.tokenize(text, messages))
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens))

    def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetInfoResponse:
        loaded = self._loaded(context)
        return convert.info_to_pb(loaded.model, loaded.runtime, self.limits, loaded.memory)

    def _ended(self, job: Job, loaded: Loaded, turn: Turn | None) -> None:
        """The RPC-done callback: the client cancelled, went away or passed its deadline, or the
        call completed (then cancelling is a no-op). A cancelled turn frees its session now,
        so the client may send its next message at once. It runs on grpc's one polling
        thread, which every call's events wait for: it must never block."""
        loaded.scheduler.cancel(job)
        if turn is not None:
            loaded.conversations.release_soon(turn.claim)  # never block the polling thread
        with self._streams_changed:
            self._streams.discard(job)
            self._streams_changed.notify_all()

    def wait_for_streams(self, timeout: float) -> bool:
        """Wait until every Generate call has ended (its last message sent); False on timeout."""
        with self._streams_changed:
            return self._streams_changed.wait_for(lambda: not self._streams, timeout)

    def set_model_sha256(self, sha256: str) -> None:
        if self.loaded is not None:
            self.loaded.model = replace(self.loaded.model, sha256=sha256)

    def _loaded(self, context: grpc.ServicerContext) -> Loaded:
        if self.draining:
            _abort(context, grpc.StatusCode.UNAVAILABLE,
                   "the server is shutting down; retry on another instance")  # fmt: skip
        if self.loaded is None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, "the model is loading; retry shortly")
        return self.loaded


# Domain errors and the gRPC status each one is.
_STATUS: dict[type[Exception], grpc.StatusCode] = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReadyError: grpc.StatusCode.UNAVAILABLE,
}


def _checked(context: grpc.ServicerContext, make: Callable[[], T]) -> T:
    """Run a step of a call: a domain error ends the call with its status, anything else
    with INTERNAL (and a log entry)."""
    try:
        return make()
    except tuple(_STATUS) as e:
        code = next(code for kind, code in _STATUS.items() if isinstance(e, kind))
        _abort(context, code, str(e))
    except Exception as e:
        log.exception("request handling failed")
        _abort(context, grpc.StatusCode.INTERNAL, f"could not process the request: {e}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
