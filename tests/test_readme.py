"""The README's HTTP examples work when pasted: each curl command and the Python snippet run
against a live server (its port in place of 8080)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm.server import Server

README = (Path(__file__).parent.parent / "README.md").read_text()
SECTION = README.split("## The OpenAI-style HTTP API", 1)[1].split("\n## ", 1)[0]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", SECTION, re.S)


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
