"""The EdgeLLM servicer: convert -> admit -> engine -> stream.

A Generate call is validated and tokenized on its own handler thread, then waits in the
scheduler's queue for the engine; its chunks come back through the job and go out one message
per chunk. The RPC-done callback cancels the job, whether the client cancelled, went away or
passed its deadline (grpcio's context.is_active() is not reliable for that: grpc #20259).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn, TypeVar

import grpc

from edge_llm import convert
from edge_llm.admission import Job, Scheduler
from edge_llm.memory import MemoryPlan
from edge_llm.types import ModelInfo, NotReadyError, QueueFullError, RequestError, RuntimeInfo
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
        req = _valid(context, lambda: convert.generate_request_from_pb(request, self.limits))
        loaded = self._loaded(context)
        prompt = _valid(context, lambda: loaded.engine.prompt_tokens(req))
        job = Job(req, prompt, received_at=received_at, peer=context.peer())
        with self._streams_changed:
            self._streams.add(job)
        if not context.add_callback(lambda: self._ended(job, loaded.scheduler)):
            self._ended(job, loaded.scheduler)
            return  # the call ended while we were tokenizing
        try:
            loaded.scheduler.submit(job)
        except QueueFullError as e:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except NotReadyError as e:
            _abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        fields = {"REQUEST_ID": job.id, "PEER": job.peer, "PROMPT_TOKENS": len(prompt)}
        log.info("request %d queued: %d prompt tokens from %s", job.id, len(prompt), job.peer,
                 extra=fields)  # fmt: skip
        if self.log_prompts:
            text = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
            log.info("request %d prompt: %s", job.id, text, extra={**fields, "PROMPT": text})
        try:
            for chunk in job.chunks():
                yield convert.chunk_to_pb(chunk)
        except RequestError as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Exception as e:
            _abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {e}")

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        text, messages = _valid(
            context, lambda: convert.tokenize_request_from_pb(request, self.limits)
        )
        engine = self._loaded(context).engine
        tokens = _valid(context, lambda: engine.tokenize(text, messages))
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens))

    def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetInfoResponse:
        loaded = self._loaded(context)
        return convert.info_to_pb(loaded.model, loaded.runtime, self.limits, loaded.memory)

    def _ended(self, job: Job, scheduler: Scheduler) -> None:
        """The RPC-done callback: the client cancelled, went away or passed its deadline, or the
        call completed (then cancelling is a no-op)."""
        scheduler.cancel(job)
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


def _valid(context: grpc.ServicerContext, make: Callable[[], T]) -> T:
    """Run a conversion or tokenization: a bad request is INVALID_ARGUMENT, a failure INTERNAL."""
    try:
        return make()
    except RequestError as e:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception as e:
        log.exception("request handling failed")
        _abort(context, grpc.StatusCode.INTERNAL, f"could not process the request: {e}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
