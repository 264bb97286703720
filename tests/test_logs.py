"""Logs: the journal with structured fields under systemd, lines on stderr otherwise, and
never the prompt text unless asked.

The journal test runs the server in a private mount namespace where a real AF_UNIX datagram
socket of the test's is bind-mounted at /run/systemd/journal/socket, so libsystemd's
sd_journal_send writes to it exactly as it would to journald.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import ServeProcess

from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

SECRET = "zebra-7f3a marmalade"  # in the prompt only: it must not reach the logs


def parse_native(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=value lines, or KEY\\n<le64 size><bytes>\\n."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = end + 1
        else:
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            key, value = line, data[end + 9 : end + 9 + size]
            i = end + 9 + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


class JournalSocket:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="el-journal-")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self.dir, "socket"))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.records: list[dict[str, str]] = []
        self.raw: list[bytes] = []
        self._arrived = threading.Condition()
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            with self._arrived:
                self.raw.append(data)
                self.records.append(parse_native(data))
                self._arrived.notify_all()

    def wait_for(self, text: str, timeout: float = 60) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            return next((r for r in self.records if text in r.get("MESSAGE", "")), None)

        with self._arrived:
            if not self._arrived.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no journal record with {text!r}: {self.records}")
            return found()  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def journal() -> Iterator[JournalSocket]:
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a private mount namespace (root, or unprivileged user namespaces)")
    j = JournalSocket()
    yield j
    j.close()


def generate(port: int, max_tokens: int = 6) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        request = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=f"Remember {SECRET}.")],
            max_tokens=max_tokens,
            ignore_eos=True,  # exactly max_tokens: the tests look for that count
        )
        list(pb_grpc.EdgeLLMStub(ch).Generate(request, timeout=60))


@pytest.mark.parametrize("log_prompts", [False, True])
def test_journal_records_carry_request_fields(
    tiny_model: Path, journal: JournalSocket, log_prompts: bool
) -> None:
    # systemd hands the service a stderr stream and names it in JOURNAL_STREAM (device:inode).
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    mount = (
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && "
        'mount --bind "$0" /run/systemd/journal && exec "$@"'
    )
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount,
        journal.dir,
        sys.executable,
        "-m",
        "edge_llm",
        "serve",
        "--model",
        str(tiny_model),
        "--port",
        "0",
        *(["--log-prompts"] if log_prompts else []),
    ]
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    proc = subprocess.Popen(cmd, stderr=write_end, env=env)
    os.close(write_end)
    try:
        listening = journal.wait_for("listening on")
        port = int(listening["MESSAGE"].split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        journal.wait_for("ready:")
        generate(port)
        queued = journal.wait_for("queued:")
        finished = journal.wait_for(f"request {queued['REQUEST_ID']} finished:")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        stderr = os.read(read_end, 1 << 16).decode()
        os.close(read_end)

    assert listening["SYSLOG_IDENTIFIER"] == "edge-llm"
    assert listening["PRIORITY"] == "6"  # info
    assert finished["REQUEST_ID"].isdigit()
    assert finished["PEER"].startswith("ipv4:127.0.0.1:")
    assert finished["COMPLETION_TOKENS"] == "6"
    assert int(finished["PROMPT_TOKENS"]) > 0
    assert float(finished["TIME_TO_FIRST_TOKEN_MS"]) > 0
    assert finished["FINISH_REASON"] == "length"
    assert queued["PEER"] == finished["PEER"]
    assert "edge_llm" not in stderr  # our log went to the journal (ggml prints one line there)
    logged_secret = any(SECRET.encode() in data for data in journal.raw)
    assert logged_secret == log_prompts
    if log_prompts:
        assert SECRET in journal.wait_for("prompt:")["PROMPT"]


def test_stderr_lines_without_systemd_and_no_prompt_text(tiny_model: Path) -> None:
    server = ServeProcess(tiny_model, env={"JOURNAL_STREAM": "1:1"})  # not our stderr
    try:
        server.wait_until_serving()
        generate(server.port)
        line = server.wait_for_log("+ 6 completion tokens")
    finally:
        server.proc.terminate()
        assert server.wait(30) == 0
    assert " INFO edge_llm.admission: request " in line and "finished: length" in line
    assert SECRET not in server.log
