"""The README's examples work when pasted: each curl command and the Python snippet of the HTTP
API against a live server (its port in place of 8080), and the network set-up (a certificate,
tokens, TLS) with its clients."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ServeProcess
from test_health_reflection import grpcurl

from edge_llm.server import Server

README = (Path(__file__).parent.parent / "README.md").read_text()
SECTION = README.split("## The OpenAI-style HTTP API", 1)[1].split("\n## ", 1)[0]


def blocks(language: str, section: str = SECTION) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


CURLS = [c for c in blocks("sh")[0].replace("\\\n", " ").splitlines() if c.startswith("curl")]


@pytest.mark.parametrize("command", CURLS, ids=[c.split()[2].rsplit("/", 1)[-1] for c in CURLS])
def test_curl_examples(command: str, server: Server) -> None:
    live = command.replace("127.0.0.1:8080", f"127.0.0.1:{server.http_port}")
    out = subprocess.run(
        ["bash", "-c", live + " --fail-with-body"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    if '"stream":true' in command:
        events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 3
    else:
        assert "error" not in json.loads(out.stdout)


def test_python_example(server: Server) -> None:
    (snippet,) = blocks("python")
    live = snippet.replace("127.0.0.1:8080", f"127.0.0.1:{server.http_port}")
    out = subprocess.run([sys.executable, "-c", live], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_the_network_set_up_works_when_pasted(tiny_model: Path, tmp_path: Path) -> None:
    """Each set-up (tokens, then client certificates) run as written in one scratch directory,
    but `edge-llm serve`, started with the same flags on free ports; then its clients."""
    section = README.split("## On a network: tokens and TLS", 1)[1].split("\n## ", 1)[0]
    tokens_set_up, tokens_clients, mtls_set_up, mtls_clients = (
        b.replace("\\\n", " ") for b in blocks("sh", section)
    )
    pasted(tiny_model, tmp_path, tokens_set_up, tokens_clients)
    pasted(tiny_model, tmp_path, mtls_set_up, mtls_clients)


def pasted(tiny_model: Path, directory: Path, set_up: str, clients: str) -> None:
    *commands, serve_line = set_up.strip().splitlines()
    assert serve_line.startswith("edge-llm serve ")
    made = subprocess.run(["bash", "-euc", "\n".join(commands)], cwd=directory, capture_output=True)
    assert made.returncode == 0, made.stderr
    flags = shlex.split(serve_line)[2:]
    flags[flags.index("--http-listen") + 1] = "0.0.0.0:0"
    for i, flag in enumerate(flags):
        if flag in ("--auth-tokens", "--tls-cert", "--tls-key", "--tls-client-ca"):
            flags[i + 1] = str(directory / flags[i + 1])
    serve = ServeProcess(tiny_model, *flags)
    try:
        serve.wait_for_log("ready:")
        live = (
            clients.replace(":50051", f":{serve.port}")
            .replace(":8080", f":{serve.http_port}")
            .replace("grpcurl ", f"{grpcurl()} ")
        )
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the venv's edge-llm
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", live],
            cwd=directory,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": path},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        assert "edge_llm.v1.EdgeLLM" in out.stdout and '"object":"list"' in out.stdout
    finally:
        serve.kill()
