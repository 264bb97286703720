"""The memory plan: arithmetic on real model shapes, and the server acting on it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from helpers import make_config, start_server

from edge_llm import memory, models
from edge_llm.engine import read_shape
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

MIB = memory.MIB
# Qwen2.5-0.5B's dimensions (the default model), as its GGUF states them.
QWEN = memory.ModelShape(
    weights_bytes=491_400_064,
    n_layer=24,
    n_head_kv=2,
    key_length=64,
    value_length=64,
    n_vocab=151936,
    n_embd=896,
    trained_context=32768,
)


# SmolLM2-135M's (the tiny test model), its weights as its Q4_1 file holds them.
SMOL = memory.ModelShape(
    weights_bytes=98_362_432,
    n_layer=30,
    n_head_kv=3,
    key_length=64,
    value_length=64,
    n_vocab=49152,
    n_embd=576,
    trained_context=8192,
)


def test_kv_cache_per_token() -> None:
    assert memory.kv_bytes_per_token(QWEN) == 24 * 2 * (64 + 64) * 2  # 12 KiB, as llama.cpp logs
    assert memory.kv_bytes_per_token(QWEN, "q8_0") == 24 * 2 * 128 * 34 // 32


def test_requested_context_fits_in_two_gib() -> None:
    plan = memory.plan(QWEN, 8192, 256, memory.budget(None).bytes)
    assert plan.context_length == 8192 and not plan.shrunk
    assert plan.kv == 96 * MIB  # llama.cpp: "KV buffer size = 96.00 MiB"
    assert plan.total < 2 * memory.GIB


def test_context_shrinks_to_the_budget_in_whole_steps() -> None:
    plan = memory.plan(QWEN, 32768, 256, 1000 * MIB)
    assert plan.shrunk and plan.context_length % memory.CONTEXT_STEP == 0
    assert plan.total <= 1000 * MIB
    step = memory.CONTEXT_STEP
    more = memory.compute_bytes(QWEN, 256, 4, plan.context_length + step) - plan.compute
    assert plan.total + plan.kv_per_token * step + more > 1000 * MIB  # no room left


def test_parallel_requests_are_as_many_as_the_context_holds_up_to_four() -> None:
    gib = memory.GIB
    assert memory.plan(QWEN, 8192, 256, 2 * gib, answer_tokens=512).parallel == 4
    assert memory.plan(QWEN, 2048, 256, 2 * gib, answer_tokens=512).parallel == 2
    assert memory.plan(QWEN, 1024, 256, 2 * gib, answer_tokens=512).parallel == 1
    configured = memory.plan(QWEN, 8192, 256, 2 * gib, parallel=8)
    assert configured.parallel == 8
    # Each sequence has a row of logits in the compute and output buffers.
    assert configured.compute > memory.plan(QWEN, 8192, 256, 2 * gib).compute


def test_context_never_exceeds_what_the_model_was_trained_on() -> None:
    assert memory.plan(QWEN, 100_000, 256, 8 * memory.GIB).context_length == 32768


def test_too_small_a_budget_is_refused_with_the_numbers() -> None:
    with pytest.raises(memory.MemoryPlanError, match=r"does not fit in 680 MiB: weights 469 MiB"):
        memory.plan(QWEN, 4096, 256, 680 * MIB)


def test_budget_is_the_tightest_of_cap_cgroup_physical_and_available() -> None:
    gib = memory.GIB
    assert memory.budget(None).bytes == 2 * gib
    assert memory.budget(1536 * MIB).bytes == 1536 * MIB
    assert memory.budget(16 * gib, 24 * gib, 20 * gib).bytes == 2 * gib
    physical = memory.budget(2 * gib, 1 * gib, 900 * MIB)
    assert physical.bytes == 1 * gib - memory.OS_HEADROOM
    assert physical.why == "physical memory 1024 MiB less 256 MiB for the system"
    busy = memory.budget(None, 4 * gib, 1200 * MIB)  # other programs hold the rest
    assert (busy.bytes, busy.why) == (1200 * MIB, "the memory available at start-up")


def test_shape_is_read_from_the_gguf(tiny_model: Path) -> None:
    shape = read_shape(tiny_model)
    assert (shape.n_layer, shape.n_head_kv, shape.key_length, shape.n_vocab) == (30, 3, 64, 49152)
    assert shape.weights_bytes == tiny_model.stat().st_size


@pytest.mark.skipif(not models.resolve("default").is_file(), reason="default model not fetched")
def test_default_model_shape_matches() -> None:
    assert read_shape(models.resolve("default")) == QWEN


def test_server_shrinks_the_context_and_reports_the_plan(tiny_model: Path) -> None:
    server = start_server(tiny_model, context_length=8192, memory_budget_mb=400)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            info = pb_grpc.EdgeLLMStub(ch).GetInfo(pb.GetInfoRequest())
        mem = info.memory
        assert mem.requested_context_length == 8192
        assert 512 <= mem.context_length < 8192
        assert info.limits.context_length == mem.context_length
        assert mem.total_bytes <= mem.budget_bytes == 400 * MIB
        assert mem.kv_cache_bytes == mem.kv_bytes_per_token * mem.context_length
        assert mem.session_cache_bytes == 0  # given up before any context
    finally:
        server.stop(drain=0)


def test_server_that_cannot_fit_refuses_to_load(tiny_model: Path) -> None:
    from edge_llm.server import Server

    server = Server(make_config(tiny_model, memory_budget_mb=200))
    server.start()
    try:
        with pytest.raises(memory.MemoryPlanError, match="does not fit in 200 MiB"):
            server.load()
    finally:
        server.stop(drain=0)


def test_saved_sessions_give_way_before_the_context() -> None:
    shape = replace(SMOL, weights_bytes=100 * MIB)
    roomy = memory.plan(shape, 2048, 64, 2048 * MIB, sessions_bytes=128 * MIB)
    assert roomy.sessions == 128 * MIB and roomy.context_length == 2048
    tight = memory.plan(shape, 2048, 64, 400 * MIB, sessions_bytes=128 * MIB)
    assert tight.context_length == 2048 and 0 < tight.sessions < 128 * MIB
    assert tight.total <= 400 * MIB


@pytest.mark.parametrize(("budget_mb", "context"), [(0, 8192), (400, None)])
def test_an_unset_context_is_the_most_the_plan_allows_up_to_8192(
    tiny_model: Path, caplog: pytest.LogCaptureFixture, budget_mb: int, context: int | None
) -> None:
    with caplog.at_level("INFO", logger="edge_llm.server"):
        server = start_server(tiny_model, context_length=0, memory_budget_mb=budget_mb)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            info = pb_grpc.EdgeLLMStub(ch).GetInfo(pb.GetInfoRequest())
        assert info.memory.requested_context_length == memory.AUTO_CONTEXT
        if context is not None:
            assert info.limits.context_length == context
        else:  # shrunk to the budget, without a warning: nobody asked for more
            assert 512 <= info.limits.context_length < memory.AUTO_CONTEXT
        assert "does not fit" not in caplog.text
    finally:
        server.stop(drain=0)
