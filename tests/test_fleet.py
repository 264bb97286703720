"""Several boards behind one client: what README's fleet note tells clients to do works.

Two real servers on loopback ports stand in for two boards; the client uses round_robin with
client-side health checking, as the README shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from helpers import start_server

from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "edge_llm.v1.EdgeLLM"},
    }
)


def test_round_robin_spreads_calls_and_leaves_a_stopping_board_alone(tiny_model: Path) -> None:
    boards = [start_server(tiny_model), start_server(tiny_model)]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{b.port}" for b in boards)
        options = [("grpc.service_config", SERVICE_CONFIG)]
        with grpc.insecure_channel(target, options=options) as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            request = pb.GenerateRequest(prompt="Hi", max_tokens=2)

            def served() -> list[int]:
                return [b.core.loaded.scheduler.served for b in boards]  # type: ignore[union-attr]

            def calls(n: int) -> list[int]:
                """Calls each board served out of `n` new ones."""
                before = served()
                for _ in range(n):
                    list(stub.Generate(request, timeout=30, wait_for_ready=True))
                return [after - b for after, b in zip(served(), before, strict=True)]

            for _ in range(20):  # round_robin uses a board once it is connected and healthy
                if min(served()) > 0:
                    break
                calls(1)
            assert calls(6) == [3, 3]

            # Board 2 starts to stop: its health turns NOT_SERVING and the client moves away
            # before its port closes, without a failed call.
            boards[1].health.enter_graceful_shutdown()
            for _ in range(50):  # until its health Watch has told the client
                if calls(2) == [2, 0]:
                    break
            assert calls(4) == [4, 0]
    finally:
        for board in boards:
            board.stop(drain=0)
