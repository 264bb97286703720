"""Shared fixtures: the tiny real model and real servers on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import start_server

from edge_llm import models
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    path = models.resolve("tiny")
    if not path.is_file():
        pytest.fail(f"test model missing: {path}; run `edge-llm fetch-model tiny`")
    return path


@pytest.fixture(scope="session")
def server(tiny_model: Path) -> Iterator[Server]:
    srv = start_server(tiny_model)
    yield srv
    srv.stop(drain=0)


@pytest.fixture(scope="session")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.EdgeLLMStub:
    return pb_grpc.EdgeLLMStub(channel)
