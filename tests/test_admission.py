"""Scheduling logic with a fake engine (fast); the real engine is covered in test_generate.py."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

import pytest

from edge_llm.admission import Job, Scheduler
from edge_llm.types import (
    FinishReason,
    GenerateRequest,
    GenerationStats,
    NotReadyError,
    QueueFullError,
    Sampling,
)


class FakeEngine:
    """Emits one token per `step` event so a test controls exactly how far each job gets."""

    def __init__(self) -> None:
        self.step = threading.Semaphore(0)
        self.ran: list[str] = []
        self.entered = threading.Event()

    def generate(
        self,
        prompt: list[int],
        request: GenerateRequest,
        cancelled: Callable[[], bool],
        stats: GenerationStats,
    ) -> Iterator[str]:
        self.ran.append(request.prompt or "")
        self.entered.set()
        for i in range(request.max_tokens):
            if cancelled():
                return
            self.step.acquire()
            stats.completion_tokens += 1
            yield f"t{i} "
        stats.finish_reason = FinishReason.LENGTH


def job(name: str, max_tokens: int = 3) -> Job:
    req = GenerateRequest(prompt=name, messages=(), max_tokens=max_tokens, sampling=Sampling())
    return Job(req, [1, 2, 3])


@pytest.fixture
def engine_and_scheduler() -> Iterator[tuple[FakeEngine, Scheduler]]:
    engine = FakeEngine()
    scheduler = Scheduler(engine, queue_depth=2)
    scheduler.start()
    yield engine, scheduler
    for _ in range(100):
        engine.step.release()
    scheduler.close()


def test_jobs_run_in_order_and_stream_their_chunks(engine_and_scheduler) -> None:
    engine, scheduler = engine_and_scheduler
    a, b = job("a"), job("b")
    scheduler.submit(a)
    scheduler.submit(b)
    for _ in range(6):
        engine.step.release()
    chunks = list(a.chunks())
    assert [c.text for c in chunks] == ["t0 ", "t1 ", "t2 ", ""]
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert list(b.chunks())[-1].finish_reason is FinishReason.LENGTH
    assert engine.ran == ["a", "b"]


def test_full_queue_refuses_at_once(engine_and_scheduler) -> None:
    engine, scheduler = engine_and_scheduler
    scheduler.submit(job("running"))
    engine.entered.wait(5)
    scheduler.submit(job("w1"))
    scheduler.submit(job("w2"))
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit(job("w3"))


def test_job_cancelled_while_queued_never_reaches_the_engine(engine_and_scheduler) -> None:
    engine, scheduler = engine_and_scheduler
    running, queued = job("running"), job("queued")
    scheduler.submit(running)
    engine.entered.wait(5)
    scheduler.submit(queued)
    scheduler.cancel(queued)
    assert scheduler.waiting == 0  # its place in the queue is free again
    # Its handler is not left waiting: the stream ends at once, as cancelled.
    assert [c.finish_reason for c in queued.chunks()] == [FinishReason.CANCELLED]
    for _ in range(3):
        engine.step.release()
    list(running.chunks())
    after = job("after", max_tokens=1)
    scheduler.submit(after)
    engine.step.release()
    list(after.chunks())
    assert engine.ran == ["running", "after"]


def test_running_job_stops_at_the_next_token_when_cancelled(engine_and_scheduler) -> None:
    engine, scheduler = engine_and_scheduler
    j = job("long", max_tokens=1000)
    scheduler.submit(j)
    engine.step.release()
    chunks = j.chunks()
    assert next(chunks).text == "t0 "
    at_cancel = j.stats.completion_tokens
    scheduler.cancel(j)
    engine.step.release()  # at most one more token may be in flight
    last = list(chunks)[-1]
    assert last.finish_reason is FinishReason.CANCELLED
    assert j.stats.completion_tokens - at_cancel <= 1


def test_close_ends_waiting_streams_and_refuses_new_jobs() -> None:
    engine = FakeEngine()
    scheduler = Scheduler(engine, queue_depth=2)
    scheduler.start()
    running, waiting = job("running", max_tokens=1000), job("waiting")
    scheduler.submit(running)
    engine.entered.wait(5)
    scheduler.submit(waiting)
    closer = threading.Thread(target=scheduler.close)
    closer.start()
    engine.step.release()  # the running job's in-flight token
    closer.join(5)
    assert not closer.is_alive(), "close() must return once the worker left the engine"
    assert list(waiting.chunks())[-1].finish_reason is FinishReason.CANCELLED
    assert list(running.chunks())[-1].finish_reason is FinishReason.CANCELLED
    with pytest.raises(NotReadyError, match="shutting down"):
        scheduler.submit(job("late"))


def test_job_cancelled_before_submit_never_reaches_the_engine(engine_and_scheduler) -> None:
    engine, scheduler = engine_and_scheduler
    early = job("early")
    scheduler.cancel(early)  # the RPC ended between tokenizing and queueing
    scheduler.submit(early)
    assert [c.finish_reason for c in early.chunks()] == [FinishReason.CANCELLED]
    assert engine.ran == []


def test_close_does_not_cancel_a_job_whose_last_chunk_is_out(engine_and_scheduler) -> None:
    """A session's finished turn is stored only if its job was not cancelled: a shutdown
    racing the last chunk used to cancel it, and the client got OK with no last message."""
    engine, scheduler = engine_and_scheduler
    reached, go = threading.Event(), threading.Event()

    class Gate(logging.Handler):  # holds the worker where it logs the finished request
        def emit(self, record: logging.LogRecord) -> None:
            if "finished" in record.getMessage():
                reached.set()
                go.wait(30)

    logger = logging.getLogger("edge_llm.admission")
    gate, level = Gate(), logger.level
    logger.addHandler(gate)
    logger.setLevel(logging.INFO)
    try:
        j = job("a", max_tokens=1)
        scheduler.submit(j)
        engine.step.release()
        assert reached.wait(30)
        assert scheduler.running is None  # its last chunk is out: no longer running
        scheduler.close(notice="shutting down", timeout=0)
    finally:
        go.set()
        logger.removeHandler(gate)
        logger.setLevel(level)
    assert not j.cancelled.is_set()
    assert [c.finish_reason for c in j.chunks()] == [None, FinishReason.LENGTH]


def test_a_gate_lets_some_in_some_wait_and_refuses_the_rest() -> None:
    from edge_llm.admission import Gate

    gate = Gate(size=1, waiting=1, what="tokenizations")  # first come, first in: see below
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        with gate.enter():
            inside.set()
            release.wait(30)

    def wait_then_enter() -> None:
        with gate.enter():
            second_in.set()

    first = threading.Thread(target=hold)
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=wait_then_enter)
    second.start()
    with gate._cond:  # the second is in line
        assert gate._cond.wait_for(lambda: gate._waiting == 1, 30)
    with pytest.raises(QueueFullError, match="1 tokenizations running and 1 waiting"):
        gate.enter().__enter__()
    assert not second_in.is_set()
    release.set()
    assert second_in.wait(30)
    first.join(30)
    second.join(30)
    with gate.enter():  # free again
        pass


def test_a_gate_lets_them_in_in_the_order_they_came() -> None:
    from edge_llm.admission import Gate

    gate = Gate(size=1, waiting=5, what="tokenizations")
    order: list[int] = []
    release = threading.Event()

    def holder() -> None:
        with gate.enter():
            release.wait(30)

    def waiter(n: int) -> None:
        with gate.enter():
            order.append(n)

    first = threading.Thread(target=holder)
    first.start()
    with gate._cond:
        assert gate._cond.wait_for(lambda: gate._inside == 1, 30)
    waiters = []
    for n in range(4):
        waiters.append(threading.Thread(target=waiter, args=(n,)))
        waiters[-1].start()
        with gate._cond:  # each is in line before the next comes
            assert gate._cond.wait_for(lambda n=n: gate._waiting == n + 1, 30)
    release.set()
    for t in [first, *waiters]:
        t.join(30)
    assert order == [0, 1, 2, 3]
