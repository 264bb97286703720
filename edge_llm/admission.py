"""Admission: a bounded FIFO queue in front of the engine, and the one worker thread that runs it.

gRPC handler threads submit jobs and read their chunks; the worker takes jobs one at a time. A
full queue refuses at once (the caller gets RESOURCE_EXHAUSTED) instead of letting waits grow
without bound. A job cancelled while it waits leaves the queue and never reaches the engine; a
job cancelled while it runs stops at the engine's next check (one token, or one prompt batch).

Those checks double as the worker's heartbeat: a worker that has a job but has not checked in
for a while is wedged, and the systemd watchdog stops vouching for it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from edge_llm.kvstates import KVStates
from edge_llm.types import (
    Chunk,
    FinishReason,
    GenerateRequest,
    GenerationStats,
    NotReadyError,
    QueueFullError,
    Timings,
    Usage,
)

log = logging.getLogger(__name__)

_ids = itertools.count(1)


class EngineLike(Protocol):
    def generate(
        self,
        prompt: list[int],
        request: GenerateRequest,
        cancelled: Callable[[], bool],
        stats: GenerationStats,
    ) -> Iterator[str]: ...


@dataclass(eq=False)
class Job:
    request: GenerateRequest
    prompt: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)
    id: int = field(default_factory=lambda: next(_ids))
    peer: str = ""
    received_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    # Set by the RPC-done callback (client cancelled, went away, or passed its deadline).
    cancelled: threading.Event = field(default_factory=threading.Event)
    outbox: queue.SimpleQueue[Chunk | BaseException] = field(default_factory=queue.SimpleQueue)
    # Why the server cancelled it (shutdown), for the last message; empty if the client did.
    notice: str = ""

    def chunks(self) -> Iterator[Chunk]:
        """What the engine produces, as it produces it; the last chunk has finish_reason."""
        while True:
            item = self.outbox.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class Gate:
    """At most `size` callers inside at once and `waiting` more in line, first come first in;
    one more is refused at once: work nobody can start soon is not taken (RESOURCE_EXHAUSTED)."""

    def __init__(self, size: int, waiting: int, what: str) -> None:
        self._size, self._max_waiting, self._what = size, waiting, what
        self._inside = 0
        self._line: deque[object] = deque()
        self._cond = threading.Condition()

    @property
    def _waiting(self) -> int:
        return len(self._line)

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        with self._cond:
            if self._inside >= self._size and len(self._line) >= self._max_waiting:
                raise QueueFullError(
                    f"{self._inside} {self._what} running and {len(self._line)} waiting; "
                    "retry later"
                )
            me = object()
            self._line.append(me)
            self._cond.notify_all()  # whoever watches the line sees it grow
            try:
                self._cond.wait_for(lambda: self._line[0] is me and self._inside < self._size)
            finally:
                self._line.remove(me)
                self._cond.notify_all()  # the next in line may have room too
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()


class Scheduler:
    def __init__(self, engine: EngineLike, queue_depth: int, kv: KVStates | None = None) -> None:
        self._engine = engine
        self._kv = kv  # per-session KV caches, switched before each job
        self.queue_depth = queue_depth
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._closed = False
        self.running: Job | None = None
        self.recent: deque[Job] = deque(maxlen=64)  # jobs that reached the engine, newest last
        self.served = 0  # jobs the engine finished, cancelled ones included
        self._heartbeat = time.monotonic()  # the running job's last check-in
        self._thread = threading.Thread(target=self._work, name="engine-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_room(self) -> None:
        """Refuse now what submit() would refuse, before any work is spent on the request."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if not self._accepting:
            raise NotReadyError("the server is shutting down; retry on another instance")
        if len(self._waiting) >= self.queue_depth:
            raise QueueFullError(
                f"the queue is full ({self.queue_depth} requests waiting); retry later"
            )

    def submit(self, job: Job) -> None:
        with self._cond:
            self._check_room()
            if job.cancelled.is_set():  # the call ended before it got here
                job.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED))
                return
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            if job.cancelled.is_set():
                return
            job.cancelled.set()
            if job in self._waiting:
                # It never reaches the engine; end its stream so its handler thread is freed.
                self._waiting.remove(job)
                job.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED))
                log.info("request %d cancelled while queued", job.id)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def stalled_for(self) -> float:
        """Seconds the running job has gone without checking in; 0 when idle, inf if dead."""
        if not self._thread.is_alive():
            return float("inf")
        with self._cond:
            return 0.0 if self.running is None else time.monotonic() - self._heartbeat

    def drain(self, timeout: float) -> bool:
        """Refuse new jobs and let the accepted ones finish; False if some were still there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while self._waiting or self.running is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, notice: str = "", timeout: float | None = None) -> bool:
        """Refuse new jobs, cancel the waiting ones, and wait for the worker to leave the engine.

        The running job is cancelled too, so the worker stops within one token or prompt batch;
        only then may the engine be freed: False if it had not left after `timeout` seconds.
        `notice` goes in each cancelled job's last message.
        """
        with self._cond:
            self._accepting = False
            self._closed = True
            for job in self._waiting:
                job.cancelled.set()
                job.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED, notice=notice))
            self._waiting.clear()
            running = self.running
            if running is not None:
                running.notice = notice
                running.cancelled.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        if running is not None:  # stuck in the engine: end its stream for it
            running.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED, notice=notice))
        return False

    def _take(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            self.running = job
            self._heartbeat = time.monotonic()
            return job

    def _work(self) -> None:
        while (job := self._take()) is not None:
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                    self._cond.notify_all()  # drain() waits for this

    def _check_in(self, job: Job) -> bool:
        """The engine's cancel check, between prompt batches and tokens: also the heartbeat."""
        self._heartbeat = time.monotonic()
        return job.cancelled.is_set()

    def _run(self, job: Job) -> None:
        job.started_at = time.monotonic()
        self.recent.append(job)
        try:
            if self._kv is not None:
                self._kv.activate(job.request.session_id)
            for text in self._engine.generate(
                job.prompt, job.request, lambda: self._check_in(job), job.stats
            ):
                job.outbox.put(Chunk(text))
        except Exception as e:  # the handler turns it into a gRPC status
            log.exception("request %d failed in the engine", job.id, extra={"REQUEST_ID": job.id})
            self.served += 1
            job.outbox.put(e)
            return
        stats = job.stats
        reason = stats.finish_reason or FinishReason.CANCELLED
        timings = _timings(job)
        notice = job.notice if reason is FinishReason.CANCELLED else ""
        self.served += 1  # before the last chunk: whoever reads it sees the count include it
        with self._cond:  # done before its last chunk goes: close() must not cancel it now
            self.running = None
            self._cond.notify_all()
        job.outbox.put(Chunk("", reason, _usage(stats), timings, notice))
        _log_finished(job, reason, timings)


def _log_finished(job: Job, reason: FinishReason, t: Timings) -> None:
    """One line per request; under systemd its numbers are also journal fields."""
    stats = job.stats
    log.info(
        "request %d finished: %s, %d prompt tokens (%d reused) + %d completion tokens; queue "
        "%.0f ms, first token %.0f ms, %.1f tokens/s, total %.0f ms",
        job.id,
        reason.value,
        stats.prompt_tokens,
        stats.prompt_tokens_reused,
        stats.completion_tokens,
        t.queue_ms,
        t.time_to_first_token_ms,
        t.decode_tokens_per_second,
        t.total_ms,
        extra={
            "REQUEST_ID": job.id,
            "PEER": job.peer,
            "FINISH_REASON": reason.value,
            "PROMPT_TOKENS": stats.prompt_tokens,
            "PROMPT_TOKENS_REUSED": stats.prompt_tokens_reused,
            "COMPLETION_TOKENS": stats.completion_tokens,
            "QUEUE_MS": round(t.queue_ms),
            "TIME_TO_FIRST_TOKEN_MS": round(t.time_to_first_token_ms),
            "DECODE_TOKENS_PER_SECOND": round(t.decode_tokens_per_second, 1),
            "TOTAL_MS": round(t.total_ms),
        },
    )


def _usage(stats: GenerationStats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        prompt_tokens_reused=stats.prompt_tokens_reused,
    )


def _timings(job: Job) -> Timings:
    stats, started = job.stats, job.started_at or job.received_at
    end = time.monotonic()
    first = stats.first_token_at or end
    last = stats.last_token_at or first
    decode_tps = (stats.completion_tokens - 1) / (last - first) if last > first else 0.0
    return Timings(
        queue_ms=(started - job.received_at) * 1e3,
        prompt_ms=(first - started) * 1e3,
        time_to_first_token_ms=(first - job.received_at) * 1e3,
        decode_tokens_per_second=decode_tps,
        total_ms=(end - job.received_at) * 1e3,
    )
