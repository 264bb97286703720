"""Under systemd: READY after the load, the watchdog, and a graceful stop.

Each test runs `edge-llm serve` as its own process with a real AF_UNIX datagram socket as
NOTIFY_SOCKET, as systemd would, and talks to it over gRPC on a loopback port.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import NotifySocket, ServeProcess

from edge_llm.systemd import Notifier, Watchdog
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def serve(model: Path, notify: NotifySocket, *args: str, **env: str) -> ServeProcess:
    return ServeProcess(model, *args, env={"NOTIFY_SOCKET": notify.path, **env})


def story(max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt="Once upon a time", max_tokens=max_tokens, temperature=0, ignore_eos=True
    )


def collect(call: Iterator[pb.GenerateResponse]) -> tuple[str, pb.GenerateResponse]:
    parts, last = [], pb.GenerateResponse()
    for msg in call:
        parts.append(msg.text)
        last = msg
    return "".join(parts), last


def test_ready_only_after_load_and_warm_up_then_status_and_watchdog(
    tiny_model: Path, notify: NotifySocket
) -> None:
    server = serve(tiny_model, notify, WATCHDOG_USEC="1000000")
    try:
        ready_at = notify.wait_for("READY", "1")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            # The moment systemd hears READY=1, the service really is ready.
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert check.status == SERVING
            _, last = collect(pb_grpc.EdgeLLMStub(ch).Generate(story(8)))
            assert last.usage.completion_tokens == 8
        before = [f for at, f in notify.messages if at < ready_at]
        assert before and all("READY" not in f for f in before)
        assert "loading smollm2-135m-instruct-q4_1.gguf (cpu " in before[0]["STATUS"]
        ready = next(f for at, f in notify.messages if at == ready_at)
        assert "serving" in ready["STATUS"] and "served 0," in ready["STATUS"]
        assert "threads" in ready["STATUS"] and "cpu " in ready["STATUS"]

        # STATUS follows what happens; pings come every half WATCHDOG_USEC.
        notify.wait_for("STATUS", "served 1,", timeout=5)
        notify.wait_for_count("WATCHDOG", 6)
        pings = [t for t in notify.times("WATCHDOG") if t > ready_at]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        # Half the timeout apart: not more often; a busy machine may delay some, never by
        # as much as the timeout itself.
        assert 0.45 <= statistics.median(gaps) < 1.0, gaps
        notify.wait_for("STATUS", "tokens/s recently", timeout=5)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_watchdog_pings_stop_when_the_worker_is_wedged(
    tiny_model: Path, notify: NotifySocket
) -> None:
    server = serve(
        tiny_model,
        notify,
        "--drain-seconds",
        "1",
        WATCHDOG_USEC="1000000",
        EDGE_LLM_TEST_FAULT="wedge-worker",
    )
    try:
        ready_at = notify.wait_for("READY", "1")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            notify.wait_for_count("WATCHDOG", 2)  # a healthy worker is vouched for
            call = stub.Generate(story(8), timeout=30)  # hangs the worker (test-only fault)
            stalled_at = notify.wait_for("STATUS", "stalled", timeout=10)
            # The STATUS line counts the stalled seconds: 3 of them are several watchdog ticks.
            notify.wait_for_count("STATUS", 3, value="stalled")
            after = [t for t in notify.times("WATCHDOG") if t > stalled_at]
            assert after == [], "pings went on for a wedged worker"
            assert stalled_at - ready_at > 1.5
            assert "watchdog pings stopped" in server.log
            # For supervisors without a watchdog (a Kubernetes liveness probe): NOT_SERVING.
            check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert check.status == NOT_SERVING
            # systemd would kill it now. Asked to stop instead, it still stops, without
            # freeing the model under the stuck worker.
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait(120) == 0
            assert "the inference worker did not stop" in server.log
            _, last = collect(call)  # its stream was ended for it, with the notice
            assert last.finish_reason == pb.FINISH_REASON_CANCELLED
            assert "shutting down" in last.notice
    finally:
        server.kill()


def test_sigterm_mid_stream_cuts_it_off_after_the_grace_period(
    tiny_model: Path, notify: NotifySocket
) -> None:
    server = serve(tiny_model, notify, "--drain-seconds", "1")
    try:
        notify.wait_for("READY", "1")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            parts: list[str] = []
            call = stub.Generate(story(600))
            for msg in call:
                parts.append(msg.text)
                if len(parts) == 5:
                    server.proc.send_signal(signal.SIGTERM)
                    notify.wait_for("STOPPING", "1", timeout=5)
                    # New calls are refused while the stream goes on; probes see NOT_SERVING.
                    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as other:
                        with pytest.raises(grpc.RpcError) as refused:
                            list(pb_grpc.EdgeLLMStub(other).Generate(story(4), timeout=10))
                        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                        assert "shutting down" in refused.value.details()
                        check = health_pb2_grpc.HealthStub(other).Check(
                            health_pb2.HealthCheckRequest(service="edge_llm.v1.EdgeLLM")
                        )
                        assert check.status == NOT_SERVING
                if msg.finish_reason:
                    last = msg
            text = "".join(parts)
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED
        assert "shutting down" in last.notice and "send the request again" in last.notice
        # Every token made was streamed before the stream was cut short.
        assert len(parts) >= 5 and text
        assert len([p for p in parts if p]) <= last.usage.completion_tokens < 600
        assert server.wait(30) == 0
        assert "cutting off 1 unfinished requests" in server.log
        # systemd is asked for the drain time and more, whatever TimeoutStopSec= says.
        stopping = next(f for _, f in notify.messages if "STOPPING" in f)
        assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 1_000_000 + 6_000_000
    finally:
        server.kill()


def test_sigint_lets_accepted_streams_finish_and_exits_promptly(
    tiny_model: Path, notify: NotifySocket
) -> None:
    server = serve(tiny_model, notify, "--drain-seconds", "600")
    try:
        notify.wait_for("READY", "1")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == SERVING
            running = stub.Generate(story(120))
            first = next(running)
            results: dict[str, tuple[str, pb.GenerateResponse]] = {}
            queued_call = stub.Generate(story(20))
            t = threading.Thread(target=lambda: results.update(q=collect(queued_call)))
            t.start()
            server.wait_for_log(" queued: ", count=2)  # the second is in too
            server.proc.send_signal(signal.SIGINT)
            assert next(watch).status == NOT_SERVING
            text, last = collect(running)
            t.join(300)
        # Both whole: every token streamed, none cut off.
        assert first.text and text and not last.notice
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 120
        assert results["q"][0] and results["q"][1].finish_reason == pb.FINISH_REASON_LENGTH
        assert results["q"][1].usage.completion_tokens == 20
        # Done as soon as the work was: the open health Watch did not hold the stop for the
        # whole drain (600 s; the wait below is a hang guard half as long).
        assert server.wait(300) == 0
        notify.wait_for("STOPPING", "1", timeout=5)
    finally:
        server.kill()


def test_the_watchdog_survives_its_own_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing status line must not stop the pings: systemd would abort a healthy service."""
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.path)  # systemd-python sends to this
    notifier = Notifier(env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "100000"})
    failures = []

    def status() -> str:
        failures.append(1)
        raise RuntimeError("the status line broke")

    watchdog = Watchdog(notifier, lambda: 0.0, status, lambda stalled: None)
    watchdog.start()
    try:
        sock.wait_for_count("WATCHDOG", 4)
    finally:
        watchdog.stop()
        sock.close()
    assert len(failures) >= 3


def test_notifier_is_a_no_op_without_systemd() -> None:
    notifier = Notifier(env={})
    notifier.ready("x")  # nothing to send to, nothing raised
    assert notifier.watchdog_seconds == 0


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 0.0),  # meant for another process
        ({"WATCHDOG_USEC": "junk"}, 0.0),
    ],
)
def test_watchdog_timeout_from_the_environment(env: dict[str, str], seconds: float) -> None:
    assert Notifier(env=env).watchdog_seconds == seconds


def test_a_stop_during_the_load_leaves_the_model_alone(tiny_model, caplog, monkeypatch) -> None:
    """SIGTERM while the model loads: stop at once, and never free the model under the
    loader (that would crash the process instead of exiting 0)."""
    from helpers import make_config

    from edge_llm import server as server_module
    from edge_llm.server import Server

    loading, go = threading.Event(), threading.Event()
    engine = server_module.Engine

    def slow_engine(*args: object) -> object:  # the model is being read
        loading.set()
        go.wait(60)
        return engine(*args)

    monkeypatch.setattr(server_module, "Engine", slow_engine)
    server = Server(make_config(tiny_model))
    server.start()
    loader = threading.Thread(target=server.load)
    loader.start()
    assert loading.wait(60)
    with caplog.at_level("INFO", logger="edge_llm.server"):
        server.stop(drain=0)
    go.set()
    loader.join(30)
    assert "stopped during the model load" in caplog.text
    assert not loader.is_alive()


def test_a_stop_just_before_the_warm_up_is_an_ordinary_stop(tiny_model, monkeypatch) -> None:
    """SIGTERM after the scheduler exists but before the warm-up is queued: the warm-up is
    refused, and that must not turn an ordinary stop into exit status 1."""
    from helpers import make_config

    from edge_llm import server as server_module

    server = server_module.Server(make_config(tiny_model))
    stopping = threading.Event()
    warm_up = server_module._warm_up

    def signal_first(engine, scheduler) -> None:  # the signal lands here
        stopping.set()
        server.stop(drain=0)
        warm_up(engine, scheduler)

    monkeypatch.setattr(server_module, "_warm_up", signal_first)
    server.start()
    server_module._load_or_stop(server, stopping)
    assert server.load_error is None


def _stop_under_tokenize_load(model: Path, request: pb.TokenizeRequest) -> tuple[int, str]:
    """SIGTERM to a server that 8 clients keep busy with Tokenize; its exit status and log."""
    server = ServeProcess(model, "--drain-seconds", "0")
    answered, stop = threading.Event(), threading.Event()

    def tokenize() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            while not stop.is_set():
                try:
                    stub.Tokenize(request, timeout=30)
                except grpc.RpcError:
                    return  # refused or cut off by the stop: expected
                answered.set()

    callers = [threading.Thread(target=tokenize) for _ in range(8)]
    try:
        server.wait_until_serving()
        for t in callers:
            t.start()
        assert answered.wait(60)  # from now on, calls are always in flight
        server.proc.send_signal(signal.SIGTERM)
        return server.wait(60), server.log
    finally:
        stop.set()
        for t in callers:
            t.join(60)
        server.kill()


def test_sigterm_while_large_tokenize_calls_run_exits_cleanly(tiny_model: Path) -> None:
    """The model must not be freed while a call is still inside it (it segfaulted at exit)."""
    text = "The quick brown fox jumps over the lazy dog. " * 1400  # 63 KiB
    request = pb.TokenizeRequest(messages=[pb.Message(role="user", content=text)] * 15)
    for attempt in range(20):
        code, log = _stop_under_tokenize_load(tiny_model, request)
        assert code == 0, f"attempt {attempt + 1}: exit {code}; its log:\n{log}"
