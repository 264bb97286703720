"""Shared fixtures: the tiny real model and real servers on loopback ports."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import start_server

from edge_llm import models
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc


@pytest.fixture(scope="session", autouse=True)
def own_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nothing outside pytest's own temporary directory (which it prunes, keeping the last
    three runs) is written: temporary files of the tests and their servers, state, the CPU
    variant verdicts (so the self-test really runs); models are read from the real cache."""
    base = tmp_path_factory.mktemp("run")
    names = (
        "XDG_CACHE_HOME",
        "XDG_STATE_HOME",
        "EDGE_LLM_MODELS_DIR",
        "CACHE_DIRECTORY",
        "STATE_DIRECTORY",
        "EDGE_LLM_STATE_DIR",
        "TMPDIR",
        "EDGE_LLM_HTTP_LISTEN",
    )
    saved = {k: os.environ.get(k) for k in names}
    os.environ["EDGE_LLM_MODELS_DIR"] = str(models.models_dir())
    for name in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "TMPDIR"):
        (base / name).mkdir()
        os.environ[name] = str(base / name)
    for name in ("CACHE_DIRECTORY", "STATE_DIRECTORY", "EDGE_LLM_STATE_DIR"):  # would win
        os.environ.pop(name, None)
    tempfile.tempdir = str(base / "TMPDIR")
    # Every server a test starts, in process or not, takes a free HTTP port, not 8080.
    os.environ["EDGE_LLM_HTTP_LISTEN"] = "127.0.0.1:0"
    yield base
    tempfile.tempdir = None
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
