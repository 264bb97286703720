"""The service core: what every request does, whatever protocol brought it.

A generation is admitted (a full queue refuses before any work), its prompt rendered and
tokenized under a bounded gate, then it waits in the scheduler's queue for the engine and its
chunks stream back. In a session (session_id set) the stored history goes before the new
message, and the finished turn is stored before its last chunk is handed out
(conversations.py). Whoever carries the stream (the gRPC servicer, the HTTP app) calls
Generation.cancel() when its client cancels, goes away or passes its deadline: it never blocks.

Every call is counted while it runs (Appliance.call()), so the server frees the model and the
session store only once no call is inside them. This module knows no protocol: it raises the
domain errors of types.py and each skin maps them to its statuses in one place.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from edge_llm.admission import Gate, Scheduler
from edge_llm.checks import Limits
from edge_llm.conversations import Conversations, Turn
from edge_llm.decoding import Job
from edge_llm.memory import MemoryPlan
from edge_llm.metrics import Live, Metrics
from edge_llm.types import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerateRequest,
    ModelInfo,
    NotReadyError,
    RequestError,
    RuntimeInfo,
    SamplingDefaults,
    Session,
    SessionChanges,
    TurnNotKeptError,
)

if TYPE_CHECKING:
    from edge_llm.engine import Engine

log = logging.getLogger(__name__)

TOKENIZERS = 2  # tokenizations at once: each is a core's worth of work the model wants too

# Builds the validated request once the session's defaults are known (none without a session).
RequestBuilder = Callable[[SamplingDefaults | None], GenerateRequest]


@dataclass
class Loaded:
    """What exists once the model is loaded; until then calls get NotReadyError."""

    engine: Engine
    scheduler: Scheduler
    runtime: RuntimeInfo
    model: ModelInfo
    memory: MemoryPlan
    conversations: Conversations
    started_at: float = field(default_factory=time.time)  # Unix time the model was ready


class Generation:
    """One admitted request, in the queue: chunks() streams the answer; cancel() from the
    skin when its client is gone."""

    def __init__(
        self, core: Appliance, loaded: Loaded, job: Job, turn: Turn | None, api: str
    ) -> None:
        self.job, self.turn = job, turn
        self._loaded = loaded
        self._core = core
        self._api = api  # for the metrics: which skin it came through
        self._counted = False
        self._count_lock = threading.Lock()  # cancel() and chunks() run on different threads
        self._streamed = False  # chunks() has begun

    @property
    def session_id(self) -> str | None:
        return None if self.turn is None else self.turn.claim.session.id

    def chunks(self) -> Generator[Chunk]:
        """The answer as it is made; the last chunk has finish_reason. In a session the turn
        is stored before the last chunk is handed out (TurnNotKeptError if it was cancelled
        just then)."""
        loaded, job, turn = self._loaded, self.job, self.turn
        self._streamed = True
        try:
            answer: list[str] = []
            for chunk in job.chunks():
                answer.append(chunk.text)
                if turn is not None and chunk.finish_reason not in (None, FinishReason.CANCELLED):
                    keep = loaded.conversations.finish(turn, "".join(answer), job.cancelled.is_set)
                    if not keep:
                        raise TurnNotKeptError(
                            "the answer was cancelled as it finished, and not kept; send it again"
                        )
                    chunk = replace(chunk, notice=turn.notice)
                if chunk.finish_reason is not None:
                    self._count(chunk)
                yield chunk
        finally:
            self._count(None)
            if turn is not None:
                loaded.conversations.release(turn.claim)

    def cancel(self) -> None:
        """The client cancelled, went away or passed its deadline, or the call completed (then
        it is a no-op). A cancelled turn frees its session now, so the client may send its
        next message at once. Never blocks: gRPC calls it on its one polling thread."""
        self._loaded.scheduler.cancel(self.job)
        if self.turn is not None:
            self._loaded.conversations.release_soon(self.turn.claim)
        if not self._streamed:
            self._count(None)  # chunks() never ran: it counts nothing

    def _count(self, last: Chunk | None) -> None:
        """Once per generation: how it ended (None: without its last chunk read)."""
        with self._count_lock:
            if self._counted:
                return
            self._counted = True
        metrics = self._core.metrics
        if last is not None:
            metrics.finished(self._api, last)
        elif self.job.cancelled.is_set():
            metrics.requests.labels(self._api, "cancelled").inc()
        else:
            metrics.ended_without_answer(self._api, refused=False)

    def log_queued(self) -> None:
        job = self.job
        fields: dict[str, object] = {
            "REQUEST_ID": job.id,
            "PEER": job.peer,
            "PROMPT_TOKENS": len(job.prompt),
        }
        if self.session_id is not None:
            fields["SESSION_ID"] = self.session_id
        log.info(
            "request %d queued: %d prompt tokens from %s",
            job.id,
            len(job.prompt),
            job.peer,
            extra=fields,
        )
        if self._core.log_prompts:
            req = job.request
            text = req.prompt or "\n".join(f"{m.role}: {m.content}" for m in req.messages)
            log.info("request %d prompt: %s", job.id, text, extra={**fields, "PROMPT": text})


class Appliance:
    def __init__(self, limits: Limits, log_prompts: bool = False) -> None:
        self.limits = limits
        self.log_prompts = log_prompts  # prompts are private: logged only when asked to
        self.loaded: Loaded | None = None
        self.draining = False  # the server is stopping: new calls are refused
        self._calls = 0
        self._calls_changed = threading.Condition()
        # Rendering and tokenizing a prompt (Generate) or a text (Tokenize), up to 1 MiB.
        self.tokenizing = Gate(TOKENIZERS, limits.queue_depth, "tokenizations")
        self.metrics = Metrics()
        self.metrics.watch(self._live)

    @contextlib.contextmanager
    def call(self, on_done: Callable[[Callable[[], None]], bool] | None = None) -> Iterator[None]:
        """Around every call that may touch the engine or the store. With `on_done` (gRPC's
        context.add_callback), the call also counts until it is over on the wire: a handler
        returns before its status is sent, and a stop in between would cut the status off."""
        self._enter()
        if on_done is not None:
            self._enter()
            if not on_done(self._leave):
                self._leave()
        try:
            yield
        finally:
            self._leave()

    def _enter(self) -> None:
        with self._calls_changed:
            self._calls += 1

    def _leave(self) -> None:
        with self._calls_changed:  # a short lock: fine on grpc's polling thread
            self._calls -= 1
            self._calls_changed.notify_all()

    def wait_for_calls(self, timeout: float) -> bool:
        """Wait until no call runs (streams have sent their last message and status); False
        on timeout."""
        with self._calls_changed:
            return self._calls_changed.wait_for(lambda: self._calls == 0, timeout)

    def ready(self) -> Loaded:
        if self.draining:
            raise NotReadyError("the server is shutting down; retry on another instance")
        if self.loaded is None:
            raise NotReadyError("the model is loading; retry shortly")
        return self.loaded

    @property
    def serving(self) -> bool:
        return self.loaded is not None and not self.draining

    def generate(
        self,
        api: str,
        build: RequestBuilder,
        session_id: str | None,
        peer: str,
        replace_last: bool = False,
        *,
        owner: str,
    ) -> Generation:
        """Admit a request that came through `api` (grpc, openai, page) from `owner` (the
        caller's name; "" without tokens): refused at once when the queue is full (or holds
        as many of the owner's as one client may have waiting), then validated (`build`,
        with the session's defaults), tokenized and queued. In a session (the owner's) the
        session is claimed until the generation ends (chunks() finishes, or cancel());
        `replace_last`: the turn takes the place of the session's last one."""
        try:
            return self._admit(api, build, session_id, peer, replace_last, owner)
        except Exception:
            self.metrics.ended_without_answer(api, refused=True)
            raise

    def _admit(
        self,
        api: str,
        build: RequestBuilder,
        session_id: str | None,
        peer: str,
        replace_last: bool,
        owner: str,
    ) -> Generation:
        received_at = time.monotonic()
        loaded = self.ready()
        loaded.scheduler.check_room(owner)  # a full queue refuses before any work is done
        if session_id is None:
            if replace_last:
                raise RequestError("replace_last needs a session_id: the turn it replaces")
            req = build(None)
            with self.tokenizing.enter():
                prompt = loaded.engine.prompt_tokens(req)
            job = Job(req, prompt, received_at=received_at, peer=peer, owner=owner)
            generation = Generation(self, loaded, job, None, api)
        else:
            conversations = loaded.conversations
            claim = conversations.claim(session_id, owner)  # busy first, then read
            try:
                req = build(claim.session.defaults)
                with self.tokenizing.enter():
                    turn = conversations.fit(claim, req, replace_last)
            except BaseException:
                conversations.release(claim)
                raise
            job = Job(turn.request, turn.prompt, received_at=received_at, peer=peer, owner=owner)
            generation = Generation(self, loaded, job, turn, api)
        # Queued here, so a queue that filled up meanwhile, or a stop, is still a refusal.
        try:
            loaded.scheduler.submit(generation.job)
        except BaseException:
            if generation.turn is not None:
                loaded.conversations.release(generation.turn.claim)
            raise
        generation.log_queued()
        return generation

    def tokenize(self, text: str | None, messages: tuple[ChatMessage, ...]) -> list[int]:
        engine = self.ready().engine
        with self.tokenizing.enter():
            return engine.tokenize(text, messages)

    # Sessions are their owner's (the caller's name; "" without tokens): another's is
    # NotFoundError, as a missing one.
    def create_session(
        self, system_prompt: str, defaults: SamplingDefaults, title: str = "", *, owner: str
    ) -> Session:
        session = self.ready().conversations.create(system_prompt, defaults, title, owner)
        log.info("session %s created", session.id, extra={"SESSION_ID": session.id})
        return session

    def update_session(self, session_id: str, changes: SessionChanges, *, owner: str) -> Session:
        return self.ready().conversations.update(session_id, changes, owner)

    def get_session(self, session_id: str, *, owner: str) -> Session:
        return self.ready().conversations.store.get(session_id, owner)

    def list_sessions(
        self, page_size: int, page_token: str, *, owner: str
    ) -> tuple[list[Session], str]:
        return self.ready().conversations.store.list(page_size, page_token, owner)

    def delete_session(self, session_id: str, *, owner: str) -> None:
        self.ready().conversations.delete(session_id, owner)
        log.info("session %s deleted", session_id, extra={"SESSION_ID": session_id})

    def _live(self) -> Live | None:
        loaded = self.loaded
        if loaded is None:
            return None
        scheduler, memory = loaded.scheduler, loaded.memory
        return Live(
            waiting=scheduler.waiting,
            running=len(scheduler.running),
            sessions=loaded.conversations.store.count(),
            memory_budget_bytes=memory.budget,
            memory_planned_bytes=memory.total,
        )

    def set_model_sha256(self, sha256: str) -> None:
        if self.loaded is not None:
            self.loaded.model = replace(self.loaded.model, sha256=sha256)
