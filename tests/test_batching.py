"""Several requests decoding at once in the real engine (the tiny model): the batched step loop
end to end. Batched greedy output may differ from a stream alone in later tokens (the float
sums run in another order: llama.cpp #7052), so these check validity, not equality."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import Hold, start_server, submissions

from edge_llm.decoding import Job
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

PARALLEL = 4


@pytest.fixture(scope="module")
def batching(tiny_model: Path) -> Iterator[Server]:
    server = start_server(tiny_model, parallel=PARALLEL, queue_depth=8)
    yield server
    server.stop(drain=0)


@pytest.fixture(scope="module")
def stub(batching: Server) -> Iterator[pb_grpc.EdgeLLMStub]:
    with grpc.insecure_channel(f"127.0.0.1:{batching.port}") as channel:
        yield pb_grpc.EdgeLLMStub(channel)


def generate(stub: pb_grpc.EdgeLLMStub, out: dict[str, object], key: str, **fields: object) -> None:
    """A Generate call, its text and last message kept in `out` (for a thread)."""
    parts, last = [], None
    try:
        for msg in stub.Generate(pb.GenerateRequest(**fields), timeout=120):
            parts.append(msg.text)
            last = msg
        out[key] = ("".join(parts), last)
    except grpc.RpcError as e:
        out[key] = e


def start_calls(
    stub: pb_grpc.EdgeLLMStub, out: dict[str, object], name: str, n: int, max_tokens: int
) -> list[threading.Thread]:
    """n Generate calls, each in a thread of its own, started; out[f"{name}{i}"] their results."""
    threads = [
        threading.Thread(
            target=generate,
            args=(stub, out, f"{name}{i}"),
            kwargs=dict(prompt=f"{name} {i}:", max_tokens=max_tokens, ignore_eos=True),
        )
        for i in range(n)
    ]
    for t in threads:
        t.start()
    return threads


def together(server: Server, calls: dict[str, dict[str, object]], stub) -> dict[str, object]:
    """Start every call while the first is held at its first step, so that all of them are in
    the queue when it goes on: they then run in the same batch."""
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    first = next(iter(calls))
    hold = Hold(scheduler, lambda job: job.request.prompt == calls[first]["prompt"])
    arrived = submissions(scheduler, len(calls))
    out: dict[str, object] = {}
    threads = [
        threading.Thread(target=generate, args=(stub, out, key), kwargs=fields)
        for key, fields in calls.items()
    ]
    try:
        threads[0].start()
        assert hold.reached.wait(60)
        for t in threads[1:]:
            t.start()
        assert arrived.wait(60)
    finally:
        hold.release()
    for t in threads:
        t.join(120)
    return out


def test_streams_at_once_all_finish_with_their_own_usage(batching: Server, stub) -> None:
    assert stub.GetInfo(pb.GetInfoRequest()).limits.parallel == PARALLEL
    calls = {
        f"s{i}": dict(prompt=f"Story {i}: once upon a time", max_tokens=24, ignore_eos=True)
        for i in range(PARALLEL)
    }
    out = together(batching, calls, stub)
    jobs: list[Job] = list(batching.core.loaded.scheduler.recent)[-PARALLEL:]  # type: ignore[union-attr]
    for key, fields in calls.items():
        result = out[key]
        assert not isinstance(result, grpc.RpcError), result
        text, last = result
        assert text and last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 24
        count = stub.Tokenize(pb.TokenizeRequest(text=fields["prompt"])).count
        assert last.usage.prompt_tokens == count
    # They ran together: every one started before any had its last token.
    ends = [j.stats.last_token_at for j in jobs]
    assert all(j.started_at is not None and j.started_at < min(ends) for j in jobs)


def test_cancelling_one_stream_leaves_the_others_streaming(batching: Server, stub) -> None:
    scheduler = batching.core.loaded.scheduler  # type: ignore[union-attr]
    hold = Hold(scheduler, lambda job: job.request.prompt == "Doomed:" and
                job.stats.completion_tokens >= 3)  # fmt: skip
    doomed = stub.Generate(pb.GenerateRequest(prompt="Doomed:", max_tokens=500, ignore_eos=True))
    out: dict[str, object] = {}
    arrived = submissions(scheduler, 2)
    try:
        next(doomed)
        others = start_calls(stub, out, "Other", 2, max_tokens=40)
        assert arrived.wait(60)
        assert hold.reached.wait(60)  # the others are in the queue or running beside it
        doomed.cancel()
        assert hold.job is not None and hold.job.cancelled.wait(30)
    finally:
        hold.release()
    for t in others:
        t.join(120)
    with pytest.raises(grpc.RpcError) as cancelled:
        list(doomed)
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    for key in ("Other0", "Other1"):
        result = out[key]
        assert not isinstance(result, grpc.RpcError), result
        assert result[1].usage.completion_tokens == 40


def test_a_session_turn_beside_other_requests_keeps_exactly_its_own_answer(
    batching: Server, stub
) -> None:
    session = stub.CreateSession(
        pb.CreateSessionRequest(
            system_prompt="You answer briefly.",
            defaults=pb.SamplingDefaults(temperature=0, max_tokens=30),
        )
    ).session
    turn = pb.GenerateRequest(session_id=session.id)
    turn.messages.add(role="user", content="Name a fruit.")
    calls: dict[str, dict[str, object]] = {
        "a": dict(prompt="First other:", max_tokens=30, ignore_eos=True),
        "b": dict(prompt="Second other:", max_tokens=30, ignore_eos=True),
    }
    out = together(batching, calls | {"s": {"session_id": session.id, "messages": turn.messages}},
                   stub)  # fmt: skip
    result = out["s"]
    assert not isinstance(result, grpc.RpcError), result
    text, _ = result
    kept = stub.GetSession(pb.GetSessionRequest(id=session.id)).session
    assert [m.role for m in kept.messages] == ["user", "assistant"]
    assert kept.messages[1].content == text and text
    for key in ("a", "b"):
        assert out[key][0] != text  # type: ignore[index]
    # Its next turn finds its cache: only the new message is processed.
    again = pb.GenerateRequest(session_id=session.id)
    again.messages.add(role="user", content="And a vegetable?")
    list(stub.Generate(again, timeout=60))
    stats = list(batching.core.loaded.scheduler.recent)[-1].stats  # type: ignore[union-attr]
    assert stats.prompt_tokens - stats.prompt_tokens_reused < 20


def test_a_shared_system_prompt_is_copied_between_sequences(batching: Server, stub) -> None:
    scheduler = batching.core.loaded.scheduler  # type: ignore[union-attr]
    system = "You are the help desk of a bicycle shop. Answer briefly and kindly. " * 4
    session = stub.CreateSession(
        pb.CreateSessionRequest(system_prompt=system, defaults=pb.SamplingDefaults(max_tokens=4))
    ).session
    turn = pb.GenerateRequest(session_id=session.id)
    turn.messages.add(role="user", content="Do you sell bells?")
    list(stub.Generate(turn, timeout=60))
    # A request without a session, with the same system prompt: its start is copied from the
    # session's sequence (which keeps its own cache), not computed again.
    request = pb.GenerateRequest(max_tokens=4)
    request.messages.add(role="system", content=system)
    request.messages.add(role="user", content="Do you repair tyres?")
    *_, last = stub.Generate(request, timeout=60)
    stats = list(scheduler.recent)[-1].stats
    assert last.usage.prompt_tokens == stats.prompt_tokens
    assert stats.prompt_tokens_reused > 60  # the system prompt: about 70 tokens
    again = pb.GenerateRequest(session_id=session.id)
    again.messages.add(role="user", content="And lights?")
    list(stub.Generate(again, timeout=60))
    stats = list(scheduler.recent)[-1].stats
    assert stats.prompt_tokens - stats.prompt_tokens_reused < 20  # its own cache, intact


def test_a_request_sent_again_with_more_starts_from_its_saved_cache(batching: Server, stub) -> None:
    """An OpenAI client sends the whole conversation each turn: its earlier request's cache,
    saved out of the pool when another request ran, is loaded and only the rest computed."""
    scheduler = batching.core.loaded.scheduler  # type: ignore[union-attr]
    first = "A client's conversation, turn one: tell me about rivers."
    call = stub.Generate(pb.GenerateRequest(prompt=first, max_tokens=8), timeout=60)
    text = "".join(m.text for m in call)
    list(stub.Generate(pb.GenerateRequest(prompt="Someone else entirely.", max_tokens=4)))
    again = f"{first}{text} And lakes?"
    *_, last = stub.Generate(pb.GenerateRequest(prompt=again, max_tokens=4), timeout=60)
    stats = list(scheduler.recent)[-1].stats
    count = stub.Tokenize(pb.TokenizeRequest(text=first)).count
    assert stats.prompt_tokens_reused >= count - 1 and last.usage.prompt_tokens > count


def test_a_cache_moved_between_sequences_predicts_as_it_did(tiny_model: Path) -> None:
    """Saved and loaded into another sequence, or copied to one, a cache gives the next token
    the logits it gave where it was made (up to float order: the cells lie elsewhere); an empty
    cache gives others. Logits, not greedy text: near-ties may flip a token."""
    import llama_cpp
    import numpy as np

    from edge_llm.engine import Engine, EngineSettings
    from edge_llm.types import Part

    engine = Engine(tiny_model, EngineSettings(512, 64, 2, 2, sequences=4))

    def next_logits(seq: int, pos: int, token: int) -> np.ndarray:
        (row,) = engine.decode([Part(seq, pos, [token], True)])
        ptr = llama_cpp.llama_get_logits_ith(engine._ctx.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(engine._n_vocab,)).copy()

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(a))

    try:
        *context, last = engine.tokenize("The history of the printing press begins in", ())
        n = len(context)
        engine.decode([Part(0, 0, context, False)])
        saved = engine.seq_save(0)
        made = next_logits(0, n, last)
        engine.seq_drop(0)
        assert engine.seq_load(2, saved)
        loaded = next_logits(2, n, last)
        engine.seq_drop(2, n)  # back to the context alone
        engine.seq_copy(2, 3, n)
        copied = next_logits(3, n, last)
        empty = next_logits(1, 0, last)
        assert distance(made, loaded) < 1e-3 and distance(made, copied) < 1e-3
        assert distance(made, empty) > 0.1
    finally:
        engine.close()


def draining(server: Server, drain: float) -> threading.Thread:
    """server.stop(drain) in a thread, returned once the drain has begun (the service's health
    Watch says NOT_SERVING)."""
    stopping = threading.Thread(target=server.stop, kwargs=dict(drain=drain))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service="edge_llm.v1.EdgeLLM"), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopping.start()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    return stopping


def test_a_drain_lets_every_running_and_queued_stream_finish(tiny_model: Path) -> None:
    """Stopped with a grace period while two sequences are in the batch and one waits: new
    calls are refused, and all three finish their answers before the server stops."""
    server = start_server(tiny_model, parallel=2, queue_depth=4)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.EdgeLLMStub(ch)
        scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
        hold = Hold(scheduler, lambda job: len(scheduler.running) == 2 and scheduler.waiting == 1)
        arrived = submissions(scheduler, 3)
        out: dict[str, object] = {}
        try:
            threads = start_calls(stub, out, "Drained", 3, max_tokens=20)
            assert arrived.wait(60) and hold.reached.wait(60)
            stopping = draining(server, 300)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(pb.GenerateRequest(prompt="Late:", max_tokens=4), timeout=60))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            hold.release()
        for t in threads:
            t.join(120)
    stopping.join(300)
    assert not stopping.is_alive()
    for i in range(3):
        result = out[f"Drained{i}"]
        assert not isinstance(result, grpc.RpcError), result
        text, last = result
        assert text and last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 20


def test_the_end_of_a_drain_cuts_off_every_sequence_with_a_notice(tiny_model: Path) -> None:
    """When the grace period ends, both sequences in the batch stop mid-answer and the waiting
    request is dropped: each stream still gets its last message, saying why."""
    server = start_server(tiny_model, parallel=2, queue_depth=4)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.EdgeLLMStub(ch)
        scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
        hold = Hold(
            scheduler,
            lambda job: (
                scheduler.waiting == 1
                and all(j.stats.completion_tokens >= 2 for j in scheduler.running)
            ),
        )
        out: dict[str, object] = {}
        try:
            threads = start_calls(stub, out, "Cut", 3, max_tokens=400)
            assert hold.reached.wait(60)
            cut = list(scheduler.running)
            stopping = draining(server, 0)
            assert all(job.cancelled.wait(60) for job in cut)
        finally:
            hold.release()
        for t in threads:
            t.join(120)
    stopping.join(120)
    assert not stopping.is_alive()
    lasts = []
    for i in range(3):
        result = out[f"Cut{i}"]
        assert not isinstance(result, grpc.RpcError), result
        _, last = result
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED
        assert "shutting down" in last.notice and "send the request again" in last.notice
        lasts.append(last.usage.completion_tokens)
    assert sorted(lasts)[0] == 0 and all(2 <= n < 400 for n in sorted(lasts)[1:])
