"""Admission: a bounded FIFO queue in front of the engine, and the one worker thread that runs it.

gRPC and HTTP handler threads submit jobs and read their chunks. The worker starts waiting jobs,
first come first served, as long as fewer than `parallel` run and the KV pool has room for them
(kvstates.py), and advances all running jobs one token per step (decoding.py). A full queue
refuses at once (the caller gets RESOURCE_EXHAUSTED) instead of letting waits grow without
bound. A job cancelled while it waits leaves the queue and never reaches the engine; a job
cancelled while it runs leaves at the next step (one token, or one prompt chunk).

Each step doubles as the worker's heartbeat: a worker that has jobs but has not finished a step
for a while is wedged, and the systemd watchdog stops vouching for it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator

from edge_llm.decoding import Batch, Job, Running, StepEngine
from edge_llm.kvstates import KVStates
from edge_llm.types import (
    Chunk,
    FinishReason,
    GenerationStats,
    NotReadyError,
    QueueFullError,
    Timings,
    Usage,
)

log = logging.getLogger(__name__)


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
    def __init__(
        self,
        engine: StepEngine,
        kv: KVStates,
        parallel: int,
        queue_depth: int,
        batch_size: int,
        client_queue_depth: int = 0,
    ) -> None:
        """`client_queue_depth`: requests one named owner (a token's name) may have waiting,
        so one client cannot fill the queue for all (0: no such limit)."""
        self._kv = kv
        self._batch = Batch(engine, batch_size, kv.pool)
        self.parallel = parallel
        self.queue_depth = queue_depth
        self.client_queue_depth = client_queue_depth
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []  # what the worker runs; read under the lock elsewhere
        self._cond = threading.Condition()
        self._accepting = True
        self._closed = False
        self.recent: deque[Job] = deque(maxlen=64)  # jobs that reached the engine, newest last
        self.served = 0  # jobs the engine finished, cancelled ones included
        self._heartbeat = time.monotonic()  # the worker's last step
        self._thread = threading.Thread(target=self._work, name="engine-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_room(self, owner: str = "") -> None:
        """Refuse now what submit() would refuse, before any work is spent on the request."""
        with self._cond:
            self._check_room(owner)

    def _check_room(self, owner: str) -> None:
        if not self._accepting:
            raise NotReadyError("the server is shutting down; retry on another instance")
        if len(self._waiting) >= self.queue_depth:
            raise QueueFullError(
                f"the queue is full ({self.queue_depth} requests waiting); retry later"
            )
        limit = self.client_queue_depth
        if owner and limit and sum(j.owner == owner for j in self._waiting) >= limit:
            raise QueueFullError(
                f"{limit} of {owner}'s requests are waiting already, the most one client may "
                "have; retry once one has started"
            )

    def submit(self, job: Job) -> None:
        with self._cond:
            self._check_room(job.owner)
            if job.cancelled.is_set():  # the call ended before it got here
                job.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED))
                return
            self._waiting.append(job)
            self._cond.notify_all()

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
            self._cond.notify_all()  # a running one leaves at the worker's next step

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running)

    def stalled_for(self) -> float:
        """Seconds the worker has gone without a step while it has work; 0 when idle, inf if
        dead."""
        if not self._thread.is_alive():
            return float("inf")
        with self._cond:
            return time.monotonic() - self._heartbeat if self._running else 0.0

    def drain(self, timeout: float) -> bool:
        """Refuse new jobs and let the accepted ones finish; False if some were still there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while self._waiting or self._running:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, notice: str = "", timeout: float | None = None) -> bool:
        """Refuse new jobs, cancel the waiting and running ones, and wait for the worker to
        leave the engine (within one step); only then may the engine be freed: False if it had
        not left after `timeout` seconds. `notice` goes in each cancelled job's last message."""
        with self._cond:
            self._accepting = False
            self._closed = True
            for job in self._waiting:
                job.cancelled.set()
                job.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED, notice=notice))
            self._waiting.clear()
            running = list(self._running)
            for job in running:
                job.notice = notice
                job.cancelled.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        for job in running:  # stuck in the engine: end their streams for them
            job.outbox.put(Chunk("", finish_reason=FinishReason.CANCELLED, notice=notice))
        return False

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._running:
                    self._cond.wait()
                starting = self._admit()
                closed = self._closed
            for job in starting:
                self._start(job)
            for r in list(self._batch.running):
                if self._check_in(r.job) or closed:
                    self._end(r)
            if closed:
                return
            if self._batch.running:
                self._step()

    def _check_in(self, job: Job) -> bool:
        """Before each step, for each running job: whether it was cancelled."""
        return job.cancelled.is_set()

    def _admit(self) -> list[Job]:
        """The waiting jobs that start now: first come first served, as many as run at once
        and as the KV pool has room for (the first that does not fit waits, and all after it)."""
        starting: list[Job] = []
        planned = 0  # the cells of those starting now: not reserved until they start
        while self._waiting and len(self._running) < self.parallel:
            cells = self._cells(self._waiting[0])
            if not self._kv.fits(planned + cells):
                break
            planned += cells
            job = self._waiting.popleft()
            self._running.append(job)
            starting.append(job)
            if len(self._running) == 1:
                self._heartbeat = time.monotonic()  # busy from now on
        return starting

    def _cells(self, job: Job) -> int:
        return min(len(job.prompt) + job.request.max_tokens, self._kv.pool)

    def _start(self, job: Job) -> None:
        job.started_at = time.monotonic()
        self.recent.append(job)
        try:
            slot, reused = self._kv.acquire(job.request.session_id, job.prompt, self._cells(job))
        except Exception as e:
            self._fail([job], e)
            return
        try:
            self._batch.add(job, slot, reused)
        except Exception as e:
            self._kv.release(slot, intact=False)
            self._fail([job], e)

    def _step(self) -> None:
        try:
            finished = self._batch.step()
        except Exception as e:  # the handlers turn it into a status
            failed = list(self._batch.running)
            for r in failed:
                self._batch.remove(r)
                self._kv.release(r.slot, intact=False)
            self._fail([r.job for r in failed], e)
            return
        finally:
            self._heartbeat = time.monotonic()
        for r in finished:
            self._end(r)

    def _end(self, r: Running) -> None:
        """`r` finished or was cancelled: free its sequence and send its last chunk."""
        self._batch.remove(r)
        self._kv.release(r.slot)
        job, stats = r.job, r.job.stats
        reason = stats.finish_reason or FinishReason.CANCELLED
        timings = _timings(job)
        notice = job.notice if reason is FinishReason.CANCELLED else ""
        self.served += 1  # before the last chunk: whoever reads it sees the count include it
        with self._cond:  # done before its last chunk goes: close() must not cancel it now
            self._running.remove(job)
            self._cond.notify_all()  # drain() waits for this; a waiting job may fit now
        job.outbox.put(Chunk("", reason, _usage(stats), timings, notice))
        _log_finished(job, reason, timings)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            log.error(
                "request %d failed in the engine: %s",
                job.id,
                error,
                exc_info=error,
                extra={"REQUEST_ID": job.id},
            )
            self.served += 1
            with self._cond:
                self._running.remove(job)
                self._cond.notify_all()
            job.outbox.put(error)


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
