"""Helpers for tests that start their own servers."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from edge_llm.admission import Scheduler
from edge_llm.config import Config
from edge_llm.conversations import Conversations
from edge_llm.decoding import Job
from edge_llm.server import Server

# Seconds an answer may take before a test calls it hung: no speed claim. Answers take a second
# here and a minute under QEMU's ARM emulation (scripts/test-arm64).
HANG_GUARD = 600


def make_config(model: Path, **overrides: object) -> Config:
    base = dict(
        model=str(model),
        host="127.0.0.1",
        port=0,
        context_length=1024,
        batch_size=64,
        queue_depth=4,
        max_tokens=1024,
        default_max_tokens=64,
        threads=2,
        state_dir=tempfile.mkdtemp(prefix="edge-llm-state-"),
        http_listen="127.0.0.1:0",
    )
    base.update(overrides)
    return Config(**base)  # type: ignore[arg-type]


def start_server(model: Path, **overrides: object) -> Server:
    server = Server(make_config(model, **overrides))
    server.start()
    server.load()
    return server


class ServeProcess:
    """`edge-llm serve` in its own process, its log read as journald would (a full pipe would
    block the server); `port` is known once it listens."""

    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [
            sys.executable,
            "-m",
            "edge_llm",
            "serve",
            "--model",
            str(model),
            "--port",
            "0",
            "--context-length",
            "2048",
            "--threads",
            "2",
            *args,
        ]
        env = {"EDGE_LLM_STATE_DIR": tempfile.mkdtemp(prefix="edge-llm-state-"), **(env or {})}
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        self.lines: list[str] = []
        self.printed: list[str] = []  # stdout: only what the server shows a person
        self._port: int | None = None
        self.http_port: int | None = None  # once `port` is known, when HTTP is on
        self._listening = threading.Event()
        self._logged = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._logged:
                self.printed.append(line)
                self._logged.notify_all()

    def wait_for_printed(self, text: str, timeout: float = 60) -> str:
        """The first line on stdout containing `text`, once it is there."""
        with self._logged:
            self._logged.wait_for(
                lambda: any(text in line for line in self.printed) or self._ended, timeout
            )
            found = [line for line in self.printed if text in line]
        if not found:
            raise AssertionError(f"not printed: {text!r}; stdout: {''.join(self.printed)}")
        return found[0]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._logged:
                self.lines.append(line)
                self._logged.notify_all()
            if "HTTP on " in line and self.http_port is None:
                self.http_port = int(
                    line.split("HTTP on ")[1].split()[0].rstrip(":").rsplit(":", 1)[1]
                )
            if "listening on" in line and self._port is None:
                self._port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                self._listening.set()
        self._listening.set()
        with self._logged:
            self._ended = True
            self._logged.notify_all()

    def wait_for_log(self, text: str, timeout: float = 60, count: int = 1) -> str:
        """The `count`th log line containing `text`, once it is there."""

        def found() -> str | None:
            lines = [line for line in self.lines if text in line]
            return lines[count - 1] if len(lines) >= count else None

        with self._logged:
            self._logged.wait_for(lambda: found() is not None or self._ended, timeout)
            line = found()
        if line is None:
            raise AssertionError(f"no {count} log lines with {text!r}; the log:\n{self.log}")
        return line

    @property
    def port(self) -> int:
        if not self._listening.wait(60) or self._port is None:
            raise AssertionError("the server did not start listening; its log:\n" + self.log)
        return self._port

    def wait_until_serving(self, timeout: float = 60) -> None:
        """Until health says SERVING: the model is loaded and warmed up."""
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            watch = HealthStub(channel).Watch(HealthCheckRequest(), timeout=timeout)
            for response in watch:
                if response.status == HealthCheckResponse.SERVING:
                    watch.cancel()
                    return
        raise AssertionError("health never turned SERVING; its log:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout} s; its log:\n{self.log}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET: it records every
    message with the time it arrived."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="el-notify-")  # short: sun_path holds 108 bytes
        self.path = os.path.join(self._dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._arrived = threading.Condition(threading.RLock())
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._arrived:
                self.messages.append((time.monotonic(), fields))
                self._arrived.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60) -> float:
        """When the first message with `key` (equal to, or containing, `value`) arrived."""

        def found() -> float | None:
            for at, fields in self.messages:
                if key in fields and (value is None or value in fields[key]):
                    return at
            return None

        with self._arrived:
            if not self._arrived.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {key}={value or '*'} in {timeout} s: {self.messages}")
            return found()  # type: ignore[return-value]

    def wait_for_count(self, key: str, count: int, value: str = "", timeout: float = 60) -> None:
        """Until `count` messages with `key` (containing `value`) have arrived."""

        def arrived() -> int:
            return sum(value in f[key] for _, f in self.messages if key in f)

        with self._arrived:
            if not self._arrived.wait_for(lambda: arrived() >= count, timeout):
                raise AssertionError(f"fewer than {count} {key} in {timeout} s: {self.messages}")

    def times(self, key: str) -> list[float]:
        with self._arrived:  # re-entrant: wait_for_count holds it
            return [at for at, fields in self.messages if key in fields]

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def freed(conversations: Conversations, session_id: str) -> threading.Event:
    """An event set when `session_id` is next freed (a cancel taken in, a turn stored)."""
    done = threading.Event()
    free = conversations._free

    def watching(sid: str, token: int) -> None:
        free(sid, token)
        if sid == session_id and sid not in conversations._busy:
            conversations._free = free  # type: ignore[method-assign]
            done.set()

    conversations._free = watching  # type: ignore[method-assign]
    return done


class FakeClock:
    """time.time() and time.monotonic() for a module under test (monkeypatch its `time`): the
    wall clock can be set, as NTP or a person would; both advance together otherwise."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.wall, self.mono = wall, 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class Hold:
    """Holds the engine's worker at its next check-in (before each step: a token, or a prompt
    chunk) for a job that `matches`, until release(): what happens meanwhile happens while
    that job is mid-prompt or mid-answer, whatever the machine's speed."""

    def __init__(self, scheduler: Scheduler, matches: Callable[[Job], bool]) -> None:
        self.reached, self._go = threading.Event(), threading.Event()
        self.job: Job | None = None  # the job it holds, once reached
        check_in = scheduler._check_in

        def holding(job: Job) -> bool:
            if matches(job) and not self._go.is_set():
                self.job = job
                self.reached.set()
                self._go.wait(60)
            return check_in(job)

        scheduler._check_in = holding  # type: ignore[method-assign]
        self._undo = lambda: setattr(scheduler, "_check_in", check_in)

    def release(self) -> None:
        self._go.set()
        self._undo()


def submissions(scheduler: Scheduler, count: int) -> threading.Event:
    """An event set once `count` more jobs have entered `scheduler` (running or queued)."""
    reached, submitted = threading.Event(), itertools.count(1)
    submit = scheduler.submit

    def counting(job: Job) -> None:
        submit(job)
        if next(submitted) >= count:
            reached.set()

    scheduler.submit = counting  # type: ignore[method-assign]
    return reached
