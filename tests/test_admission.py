"""Scheduling and batching logic with a fake engine (fast); the real engine is covered in
test_generate.py and test_batching.py."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from edge_llm import decoding
from edge_llm.admission import Scheduler
from edge_llm.decoding import Job
from edge_llm.kvstates import KVStates
from edge_llm.types import (
    FinishReason,
    GenerateRequest,
    NotReadyError,
    Part,
    QueueFullError,
    Sampling,
)


class FakeSampler:
    def __init__(self) -> None:
        self.n = 0

    def close(self) -> None:
        pass


class FakeEngine:
    """A step engine (and its KV cache) whose every decode waits for one `step` release, so a
    test controls exactly how far jobs get. A sequence's n-th answer token reads "t<n> "."""

    kv_restorable = True

    def __init__(self, fail_when: Callable[[Sequence[Part]], bool] = lambda parts: False) -> None:
        self.step = threading.Semaphore(0)
        self.entered = threading.Event()  # a decode began
        self.batches: list[list[Part]] = []  # every decode's parts, in order
        self._fail_when = fail_when

    def decode(self, parts: Sequence[Part]) -> list[int]:
        self.entered.set()
        self.step.acquire()
        self.batches.append(list(parts))
        if self._fail_when(parts):
            raise RuntimeError("llama_decode failed with code -3")
        return [i if p.output else -1 for i, p in enumerate(parts)]

    def sampler(self, sampling: Sampling) -> FakeSampler:
        return FakeSampler()

    def sample(self, sampler: FakeSampler, row: int) -> int:
        sampler.n += 1
        return sampler.n - 1

    def is_end(self, token: int) -> bool:
        return False

    def piece(self, token: int) -> bytes:
        return f"t{token} ".encode()

    def seq_drop(self, seq: int, start: int = 0) -> bool:
        return True

    def seq_copy(self, source: int, target: int, n: int) -> None:
        pass

    def seq_save(self, seq: int) -> bytearray:
        return bytearray(10)

    def seq_load(self, seq: int, data: bytearray) -> bool:
        return True


def job(name: str, max_tokens: int = 3, prompt: list[int] | None = None) -> Job:
    req = GenerateRequest(prompt=name, messages=(), max_tokens=max_tokens, sampling=Sampling())
    return Job(req, prompt or [1, 2, 3])


def owned(name: str, owner: str) -> Job:
    j = job(name)
    j.owner = owner
    return j


def make_scheduler(
    engine: FakeEngine,
    tmp_path: Path,
    parallel: int = 1,
    queue_depth: int = 2,
    pool: int = 1024,
    batch_size: int = 256,
) -> Scheduler:
    kv = KVStates(engine, parallel + 2, pool, tmp_path / "kv", 0, 0)
    scheduler = Scheduler(engine, kv, parallel, queue_depth, batch_size)
    scheduler.start()
    return scheduler


def shut(engine: FakeEngine, scheduler: Scheduler) -> None:
    engine.step.release(10_000)  # the worker sees the close at its next step
    scheduler.close()


def ran(scheduler: Scheduler) -> list[str | None]:
    return [j.request.prompt for j in scheduler.recent]


@pytest.fixture
def engine_and_scheduler(tmp_path: Path) -> Iterator[tuple[FakeEngine, Scheduler]]:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path)
    yield engine, scheduler
    shut(engine, scheduler)


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
    assert ran(scheduler) == ["a", "b"]


def test_full_queue_refuses_at_once(engine_and_scheduler) -> None:
    engine, scheduler = engine_and_scheduler
    scheduler.submit(job("running"))
    engine.entered.wait(5)
    scheduler.submit(job("w1"))
    scheduler.submit(job("w2"))
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit(job("w3"))


def test_one_client_cannot_fill_the_queue_for_all(tmp_path: Path) -> None:
    """client_queue_depth: a named owner's requests beyond it are refused while others' (and
    those of no owner, without tokens) still get in."""
    engine = FakeEngine()
    kv = KVStates(engine, 3, 1024, tmp_path / "kv", 0, 0)
    scheduler = Scheduler(engine, kv, 1, 4, 256, client_queue_depth=2)
    scheduler.start()
    try:
        scheduler.submit(job("running"))
        engine.entered.wait(5)
        for name in ("k1", "k2"):
            scheduler.submit(owned(name, "kiosk"))
        with pytest.raises(QueueFullError, match="2 of kiosk's requests are waiting"):
            scheduler.check_room("kiosk")
        with pytest.raises(QueueFullError, match="2 of kiosk's requests are waiting"):
            scheduler.submit(owned("k3", "kiosk"))
        scheduler.submit(owned("t1", "terminal"))
        scheduler.submit(job("anonymous"))
        assert scheduler.waiting == 4
    finally:
        shut(engine, scheduler)


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
    assert ran(scheduler) == ["running", "after"]


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


def test_close_ends_waiting_streams_and_refuses_new_jobs(tmp_path: Path) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path)
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
    assert ran(scheduler) == [] and engine.batches == []


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
        assert scheduler.running == []  # its last chunk is out: no longer running
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


# -- batching: several jobs in one step ------------------------------------------------------


def test_running_jobs_advance_together_in_one_decode_per_step(tmp_path: Path) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path, parallel=2)
    a, b = job("a"), job("b", prompt=[4, 5, 6])  # nothing in common: b decodes all 3
    scheduler.submit(a)
    assert engine.entered.wait(30)  # a's prompt is being decoded
    scheduler.submit(b)
    for _ in range(4):  # a: prompt+t0, t1, t2; b joins at a's second step
        engine.step.release()
    assert [c.text for c in a.chunks()] == ["t0 ", "t1 ", "t2 ", ""]
    assert [c.text for c in b.chunks()] == ["t0 ", "t1 ", "t2 ", ""]
    assert len(engine.batches) == 4  # one after the other would take 6
    second = engine.batches[1]
    assert [len(p.tokens) for p in second] == [1, 3] and second[0].seq != second[1].seq
    shut(engine, scheduler)


def test_at_most_parallel_run_and_the_next_starts_when_one_ends(tmp_path: Path) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path, parallel=2, pool=4096)
    a, b, c = (job(n, max_tokens=1000) for n in "abc")
    scheduler.submit(a)
    assert engine.entered.wait(30)
    scheduler.submit(b)
    scheduler.submit(c)
    engine.step.release()  # a: its prompt, t0
    engine.step.release()  # a: t1; b: its prompt, t0
    assert next(b.chunks()).text == "t0 "
    assert scheduler.waiting == 1 and len(scheduler.running) == 2  # c waits
    scheduler.cancel(a)
    for _ in range(100):
        engine.step.release()
    assert list(a.chunks())[-1].finish_reason is FinishReason.CANCELLED
    assert next(c.chunks()).text == "t0 "  # c took a's place
    assert ran(scheduler) == ["a", "b", "c"]
    shut(engine, scheduler)


def test_cancelling_one_running_job_leaves_the_others_streaming(tmp_path: Path) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path, parallel=2)
    a, b = job("a", max_tokens=1000), job("b", max_tokens=5)
    scheduler.submit(a)
    assert engine.entered.wait(30)
    scheduler.submit(b)
    engine.step.release()
    engine.step.release()  # b's prompt is in
    scheduler.cancel(a)
    for _ in range(10):
        engine.step.release()
    assert list(a.chunks())[-1].finish_reason is FinishReason.CANCELLED
    texts = [c.text for c in b.chunks()]
    assert texts == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 ", ""]
    shut(engine, scheduler)


def test_a_new_prompt_comes_in_small_chunks_while_others_answer(tmp_path: Path) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path, parallel=2, pool=4096, batch_size=256)
    talking = job("talking", max_tokens=1000)
    long = job("long", max_tokens=1, prompt=list(range(100, 400)))  # nothing shared
    scheduler.submit(talking)
    assert engine.entered.wait(30)
    scheduler.submit(long)
    for _ in range(1 + 300 // decoding.PROMPT_CHUNK + 1):
        engine.step.release()
    assert list(long.chunks())[-1].finish_reason is FinishReason.LENGTH
    steps = engine.batches[1:]  # from the step the long prompt joined
    prompt_parts = [p for batch in steps for p in batch if len(p.tokens) > 1]
    assert sum(len(p.tokens) for p in prompt_parts) == 300
    assert all(len(p.tokens) <= decoding.PROMPT_CHUNK for p in prompt_parts)
    # and in every one of those steps the talking job got its token
    assert all(any(len(p.tokens) == 1 for p in batch) for batch in steps[: len(prompt_parts)])
    scheduler.cancel(talking)
    for _ in range(10):
        engine.step.release()
    # Alone, a long prompt gets the whole batch at once.
    alone = job("alone", max_tokens=1, prompt=list(range(1000, 1300)))
    scheduler.submit(alone)
    for _ in range(2):
        engine.step.release()
    assert list(alone.chunks())[-1].finish_reason is FinishReason.LENGTH
    assert [len(p.tokens) for p in engine.batches[-2]] == [256]
    shut(engine, scheduler)


def test_a_job_the_kv_pool_cannot_hold_yet_waits_and_nothing_overtakes_it(
    tmp_path: Path,
) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path, parallel=3, queue_depth=4, pool=100)
    a = job("a", max_tokens=50)  # 3 prompt tokens + 50: 53 cells
    big = job("big", max_tokens=60)  # 63 more do not fit beside a
    small = job("small", max_tokens=3)  # would fit, but came after big
    scheduler.submit(a)
    assert engine.entered.wait(30)
    scheduler.submit(big)
    scheduler.submit(small)
    engine.step.release()
    next(a.chunks())
    assert scheduler.waiting == 2 and ran(scheduler) == ["a"]
    for _ in range(200):
        engine.step.release()
    assert list(a.chunks())[-1].finish_reason is FinishReason.LENGTH
    assert list(big.chunks())[-1].finish_reason is FinishReason.LENGTH
    assert list(small.chunks())[-1].finish_reason is FinishReason.LENGTH
    assert ran(scheduler) == ["a", "big", "small"]
    shut(engine, scheduler)


def test_jobs_that_start_together_count_each_others_cells(tmp_path: Path) -> None:
    engine = FakeEngine()
    scheduler = make_scheduler(engine, tmp_path, parallel=3, queue_depth=4, pool=100)
    first = job("first", max_tokens=1)
    x, y = job("x", max_tokens=55), job("y", max_tokens=55)  # 58 cells each: not both
    scheduler.submit(first)
    assert engine.entered.wait(30)  # x and y wait together behind it
    scheduler.submit(x)
    scheduler.submit(y)
    engine.step.release(2)  # first's one token, then x's first step
    next(x.chunks())
    assert ran(scheduler) == ["first", "x"] and scheduler.waiting == 1
    engine.step.release(10_000)
    assert list(y.chunks())[-1].finish_reason is FinishReason.LENGTH
    assert ran(scheduler) == ["first", "x", "y"]
    shut(engine, scheduler)


def test_a_failed_step_fails_its_jobs_and_the_worker_goes_on(tmp_path: Path) -> None:
    engine = FakeEngine(fail_when=lambda parts: any(p.tokens[0] == 99 for p in parts))
    scheduler = make_scheduler(engine, tmp_path)
    bad, good = job("bad", prompt=[99, 1]), job("good")
    scheduler.submit(bad)
    engine.step.release()
    with pytest.raises(RuntimeError, match="llama_decode failed"):
        list(bad.chunks())
    scheduler.submit(good)
    for _ in range(3):
        engine.step.release()
    assert [c.text for c in good.chunks()] == ["t0 ", "t1 ", "t2 ", ""]
    shut(engine, scheduler)
