"""Shared fixtures: the tiny real model and real servers on loopback ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import start_server

from edge_llm import models
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CPU variant verdicts of this run go to a cache of its own (the developer's stay
    untouched, and the self-test really runs); models are still read from the real cache."""
    cache = tmp_path_factory.mktemp("cache")
    saved = {
        k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "EDGE_LLM_MODELS_DIR", "CACHE_DIRECTORY")
    }
    os.environ["EDGE_LLM_MODELS_DIR"] = str(models.models_dir())
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ.pop("CACHE_DIRECTORY", None)  # systemd's, which would win
    yield cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
