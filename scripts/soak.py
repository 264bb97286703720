"""A soak: one `edge-llm serve` on loopback (the default model, tokens on), and for a bounded
time a mix of clients that each loop: gRPC streams read to the end, streams cancelled after
their first token, streams with a deadline too short to finish, session turns, HTTP SSE
streams, and page WebSocket turns. Checked as it runs and at the end:

- every request ends with a last message (a finish reason, [DONE], a done frame) or a status
  the client expects (CANCELLED it asked for, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED when the
  queue is full): anything else (INTERNAL, a 5xx, a stream that stops short) is a failure;
- resident memory stays within the memory plan the server printed;
- file descriptors and threads do not grow (after the first minutes, to the end);
- the 99th percentile time to first token stays flat (the last fifth of the run against the
  first).

Run it on an idle machine: scripts/soak [--minutes 30] [--max-requests N]. Exit status 0 only
if every check held; the figures go to stdout, for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
from websockets.sync.client import connect

from edge_llm import models
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

PROMPTS = [
    "Write a haiku about the sea.",
    "Explain what a hash map is, briefly.",
    "Write a Python function that reverses a string.",
    "List three uses of a Raspberry Pi.",
    "What is the capital of France? Answer in one word.",
]


# How an exchange ended: its outcome, whether that is as it should be, its first token's time.
Outcome = tuple[str, bool, float | None]


def ask(n: int, max_tokens: int, session_id: str = "") -> pb.GenerateRequest:
    """The n-th client request: one of PROMPTS."""
    request = pb.GenerateRequest(max_tokens=max_tokens, session_id=session_id)
    request.messages.add(role="user", content=PROMPTS[n % len(PROMPTS)])
    return request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """`edge-llm serve` in a process of its own; its log is read for the memory plan."""

    def __init__(self, model: Path, tokens: Path) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        cmd = [
            sys.executable, "-m", "edge_llm", "serve", "--model", str(model),
            "--port", str(self.grpc_port), "--http-listen", f"127.0.0.1:{self.http_port}",
            "--auth-tokens", str(tokens),
        ]  # fmt: skip
        env = {**os.environ, "EDGE_LLM_STATE_DIR": tempfile.mkdtemp(prefix="soak-state-")}
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        self.plan_mib = 0
        self.log_errors: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(600):
            sys.exit("edge-llm did not become ready in 10 minutes")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if m := re.search(r"memory plan: (\d+) MiB of", line):
                self.plan_mib = int(m.group(1))
            if " ERROR " in line or "Traceback" in line:
                self.log_errors.append(line.strip())
            if "ready:" in line:
                self._ready.set()
        self._ready.set()

    def sample(self) -> tuple[float, int, int]:
        """Resident MiB, open file descriptors, threads."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        return rss, fds, threads


class Soak:
    def __init__(self, server: Server, tokens: dict[str, str], deadline: float, cap: int) -> None:
        self.server, self.tokens = server, tokens
        self.deadline, self.cap = deadline, cap
        self.started = time.monotonic()
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.ttft: list[tuple[float, float]] = []  # (seconds into the run, first token seconds)
        self.samples: list[tuple[float, float, int, int]] = []
        self._lock = threading.Lock()

    def running(self) -> bool:
        with self._lock:
            return time.monotonic() < self.deadline and sum(self.outcomes.values()) < self.cap

    def record(self, kind: str, outcome: str, ok: bool, ttft: float | None = None) -> None:
        with self._lock:
            self.outcomes[f"{kind}: {outcome}"] += 1
            if not ok:
                self.failures.append(f"{kind}: {outcome}")
            if ttft is not None:
                self.ttft.append((time.monotonic() - self.started, ttft))

    def metadata(self, client: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[client]}"),)

    # --- the clients --------------------------------------------------------------------

    def _grpc(self, kind: str, exchange: Callable[[], Outcome], *expected: grpc.StatusCode) -> None:
        """Record how a gRPC exchange ended: its own outcome, or a status, which is fine if
        `expected` (a full queue always is)."""
        try:
            outcome, ok, ttft = exchange()
        except grpc.RpcError as e:
            code = e.code()
            self.record(kind, code.name, code in (*expected, grpc.StatusCode.RESOURCE_EXHAUSTED))
            return
        self.record(kind, outcome, ok, ttft)

    def grpc_stream(self, stub: pb_grpc.EdgeLLMStub, n: int) -> None:
        def exchange() -> Outcome:
            t0, first, last = time.monotonic(), None, None
            for message in stub.Generate(ask(n, 48), metadata=self.metadata("grpc"), timeout=300):
                if first is None and message.text:
                    first = time.monotonic() - t0
                last = message
            ended = last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            return ("finished" if ended else "no last message"), ended, first

        self._grpc("grpc stream", exchange)

    def grpc_cancel(self, stub: pb_grpc.EdgeLLMStub, n: int) -> None:
        def exchange() -> Outcome:
            call = stub.Generate(ask(n, 200), metadata=self.metadata("cancel"), timeout=300)
            next(call)
            call.cancel()
            for _ in call:
                pass
            return "finished before the cancel", True, None

        self._grpc("grpc cancel", exchange, grpc.StatusCode.CANCELLED)

    def grpc_deadline(self, stub: pb_grpc.EdgeLLMStub, n: int) -> None:
        def exchange() -> Outcome:
            for _ in stub.Generate(ask(n, 400), metadata=self.metadata("deadline"), timeout=1.0):
                pass
            return "finished in time", True, None

        self._grpc("grpc deadline", exchange, grpc.StatusCode.DEADLINE_EXCEEDED)

    def session_turns(self, stub: pb_grpc.EdgeLLMStub, n: int) -> None:
        meta = self.metadata("sessions")

        def exchange() -> Outcome:
            session = stub.CreateSession(pb.CreateSessionRequest(), metadata=meta).session
            for turn in range(2):
                request = ask(n + turn, 32, session.id)
                *_, last = stub.Generate(request, metadata=meta, timeout=300)
                if last.finish_reason == pb.FINISH_REASON_UNSPECIFIED:
                    return "no last message", False, None
            stub.DeleteSession(pb.DeleteSessionRequest(id=session.id), metadata=meta)
            return "two turns, deleted", True, None

        self._grpc("session", exchange)

    def http_sse(self, http: httpx.Client, n: int) -> None:
        body = {
            "model": "default",
            "stream": True,
            "max_tokens": 48,
            "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
        }
        t0, first, done = time.monotonic(), None, False
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                ok = response.status_code == 429
                self.record("http sse", f"HTTP {response.status_code}", ok)
                return
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and first is None and '"content"' in line:
                    first = time.monotonic() - t0
        self.record("http sse", "[DONE]" if done else "no [DONE]", done, first)

    def websocket(self, http: httpx.Client, n: int) -> None:
        token = self.tokens["page"]
        created = http.post("/api/sessions", json={}, headers={"Authorization": f"Bearer {token}"})
        if created.status_code != 200:
            self.record("websocket", f"HTTP {created.status_code}", False)
            return
        offered = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
        url = f"ws://127.0.0.1:{self.server.http_port}/api/chat"
        origin = {"Origin": f"http://127.0.0.1:{self.server.http_port}"}
        with connect(
            url, additional_headers=origin, subprotocols=["edge-llm", f"bearer.{offered}"]
        ) as ws:  # type: ignore[list-item]
            frame = {"type": "send", "session_id": created.json()["id"], "max_tokens": 32,
                     "content": PROMPTS[n % len(PROMPTS)]}  # fmt: skip
            ws.send(json.dumps(frame))
            while True:
                reply = json.loads(ws.recv(timeout=300))
                if reply["type"] == "done":
                    self.record("websocket", "done", True)
                    return
                if reply["type"] == "error":
                    ok = reply.get("code") == "queue_full"
                    self.record("websocket", f"error {reply.get('code')}", ok)
                    return

    def client(self, name: str, work: Callable[..., None], http: bool) -> None:
        n = 0
        if http:
            base = f"http://127.0.0.1:{self.server.http_port}"
            headers = {"Authorization": f"Bearer {self.tokens['http']}"}
            with httpx.Client(base_url=base, headers=headers, timeout=300) as conn:
                while self.running():
                    self._guard(name, work, conn, n)
                    n += 1
            return
        with grpc.insecure_channel(f"127.0.0.1:{self.server.grpc_port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            while self.running():
                self._guard(name, work, stub, n)
                n += 1

    def _guard(self, name: str, work: Callable[..., None], *args: object) -> None:
        try:
            work(*args)
        except Exception as e:  # what no client should see: a failure, with its text
            self.record(name, f"{type(e).__name__}: {e}"[:160], False)

    def sampler(self) -> None:
        while self.running() and self.server.proc.poll() is None:
            rss, fds, threads = self.server.sample()
            self.samples.append((time.monotonic() - self.started, rss, fds, threads))
            time.sleep(10)  # a sampling period, not a wait for an event


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    clients = ["grpc", "cancel", "deadline", "sessions", "http", "page"]
    tokens = {name: secrets.token_urlsafe(24) for name in clients}
    token_file = Path(tempfile.mkdtemp(prefix="soak-")) / "tokens"
    token_file.write_text("".join(f"{name} {token}\n" for name, token in tokens.items()))
    token_file.chmod(0o600)
    server = Server(models.resolve(args.model), token_file)
    soak = Soak(server, tokens, time.monotonic() + args.minutes * 60, args.max_requests)
    work = [
        ("grpc stream", soak.grpc_stream, False),
        ("grpc cancel", soak.grpc_cancel, False),
        ("grpc deadline", soak.grpc_deadline, False),
        ("session", soak.session_turns, False),
        ("http sse", soak.http_sse, True),
        ("websocket", soak.websocket, True),
    ]
    threads = [threading.Thread(target=soak.client, args=w, daemon=True) for w in work]
    threads.append(threading.Thread(target=soak.sampler, daemon=True))
    print(f"soak: {args.minutes:g} min, memory plan {server.plan_mib} MiB", flush=True)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alive = server.proc.poll() is None
    server.proc.terminate()
    server.proc.wait(60)
    return report(soak, server, alive)


def report(soak: Soak, server: Server, alive: bool) -> int:
    minutes = (time.monotonic() - soak.started) / 60
    total = sum(soak.outcomes.values())
    print(f"\n{total} requests in {minutes:.1f} min")
    for outcome, count in sorted(soak.outcomes.items()):
        print(f"  {count:6d}  {outcome}")
    checks: list[tuple[str, bool]] = [("the server stayed up", alive)]
    checks.append(
        (f"every request ended as expected ({len(soak.failures)} did not)", not soak.failures)
    )
    checks.append(
        (f"no ERROR in the server's log ({len(server.log_errors)})", not server.log_errors)
    )
    if soak.samples:
        settled = [s for s in soak.samples if s[0] >= min(120, soak.samples[-1][0] / 5)]
        peak = max(s[1] for s in soak.samples)
        first, last = settled[0], settled[-1]
        print(f"RSS: peak {peak:.0f} MiB (plan {server.plan_mib} MiB); after warm-up "
              f"{first[1]:.0f} -> {last[1]:.0f} MiB")  # fmt: skip
        print(f"file descriptors {first[2]} -> {last[2]}, threads {first[3]} -> {last[3]}")
        checks.append(("resident memory within the plan", peak <= server.plan_mib))
        checks.append(("file descriptors do not grow", last[2] <= first[2] + 4))
        checks.append(("threads do not grow", last[3] <= first[3] + 4))
    if len(soak.ttft) >= 20:
        span = soak.ttft[-1][0]
        early = [t for at, t in soak.ttft if at <= span / 5]
        late = [t for at, t in soak.ttft if at >= span * 4 / 5]
        print(f"time to first token p99: first fifth {p99(early) * 1000:.0f} ms, last fifth "
              f"{p99(late) * 1000:.0f} ms ({len(soak.ttft)} measured)")  # fmt: skip
        checks.append(("p99 time to first token flat (last fifth <= 1.5x first)",
                       p99(late) <= 1.5 * p99(early)))  # fmt: skip
    for failure in soak.failures[:10]:
        print(f"  failure: {failure}")
    for line in server.log_errors[:10]:
        print(f"  server: {line}")
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
