"""Helpers for tests that start their own servers."""

from __future__ import annotations

from pathlib import Path

from edge_llm.config import Config
from edge_llm.server import Server


def make_config(model: Path, **overrides: object) -> Config:
    base = dict(model=str(model), host="127.0.0.1", port=0, context_length=1024, batch_size=64,
                queue_depth=4, max_tokens=1024, default_max_tokens=64, threads=2)  # fmt: skip
    base.update(overrides)
    return Config(**base)  # type: ignore[arg-type]


def start_server(model: Path, **overrides: object) -> Server:
    server = Server(make_config(model, **overrides))
    server.start()
    server.load()
    return server
