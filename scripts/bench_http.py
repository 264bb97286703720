"""What the HTTP side costs against gRPC: decode rate and time to first token as a client sees
them, through a gRPC Generate stream, the OpenAI-style SSE stream and the page's WebSocket, on
one server in this process; and the server's CPU while a chat page sits open and idle.

    .venv/bin/python scripts/bench_http.py [--model default] [--rounds 5] [--tokens 128]

The three paths take turns, `rounds` times, each answering the same prompt greedily with
`tokens` tokens (ignore_eos). Time to first token is from sending the request to the first
text; decode rate is (tokens - 1) over the time from the first text to the last. Medians; each
HTTP path against gRPC in the same run. Then the page is opened in Chromium and left alone for
10 s: the server's CPU seconds over that time, against 10 s with no page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import websockets

from edge_llm import models
from edge_llm.config import Config
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

PROMPT = "Write a long story about a lighthouse keeper and the sea."
Measure = Callable[[], tuple[float, float]]


def timed(texts: Iterator[str], started: float, tokens: int) -> tuple[float, float]:
    """(time to first text in ms, decode tokens/s) over a stream of texts."""
    first = last = 0.0
    for _ in texts:
        last = time.perf_counter()
        first = first or last
    return (first - started) * 1e3, (tokens - 1) / (last - first)


def grpc_path(port: int, tokens: int) -> Measure:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.EdgeLLMStub(channel)

    def run() -> tuple[float, float]:
        req = pb.GenerateRequest(
            messages=[pb.Message(role="user", content=PROMPT)],
            max_tokens=tokens,
            temperature=0,
            ignore_eos=True,
        )
        started = time.perf_counter()
        return timed((m.text for m in stub.Generate(req) if m.text), started, tokens)

    return run


def openai_path(http_port: int, tokens: int) -> Measure:
    client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}/v1", timeout=600)
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    def texts(r: httpx.Response) -> Iterator[str]:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    yield choices[0]["delta"]["content"]

    def run() -> tuple[float, float]:
        started = time.perf_counter()
        with client.stream("POST", "/chat/completions", json=body) as r:
            return timed(texts(r), started, tokens)

    return run


def page_path(http_port: int, tokens: int) -> Measure:
    base = f"http://127.0.0.1:{http_port}"
    url = f"ws://127.0.0.1:{http_port}/api/chat"

    async def once() -> tuple[float, float]:
        session = httpx.post(f"{base}/api/sessions", json={}).json()["id"]
        frame = {"type": "send", "session_id": session, "content": PROMPT}
        frame |= {"max_tokens": tokens, "temperature": 0}
        async with websockets.connect(url) as ws:
            started = time.perf_counter()
            await ws.send(json.dumps(frame))
            first = last = 0.0
            n = 0
            while (f := json.loads(await ws.recv()))["type"] != "done":
                if f["type"] == "delta":
                    last = time.perf_counter()
                    first = first or last
                    n += 1
            done = f
        httpx.delete(f"{base}/api/sessions/{session}")
        made = done["usage"]["completion_tokens"]
        return (first - started) * 1e3, (made - 1) / (last - first)

    return lambda: asyncio.run(once())


def idle_page_cpu(http_port: int, seconds: float) -> tuple[float, float]:
    """Server CPU seconds over `seconds` with no page, then with the page open and idle."""
    from playwright.sync_api import sync_playwright

    def cpu_over(wait: Callable[[float], None]) -> float:
        before = os.times()
        wait(seconds)
        after = os.times()
        return (after.user - before.user) + (after.system - before.system)

    alone = cpu_over(time.sleep)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{http_port}/")
        page.wait_for_selector("#conn-state[data-state=open]")
        with_page = cpu_over(time.sleep)
        browser.close()
    return alone, with_page


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    config = Config(
        model=str(models.resolve(args.model)),
        port=0,
        http_listen="127.0.0.1:0",
        state_dir=tempfile.mkdtemp(prefix="bench-http-"),
        log_level="warning",
    )
    server = Server(config)
    server.start()
    server.load()
    try:
        paths = {
            "gRPC Generate": grpc_path(server.port, args.tokens),
            "OpenAI SSE": openai_path(server.http_port, args.tokens),
            "page WebSocket": page_path(server.http_port, args.tokens),
        }
        for run in paths.values():
            run()  # warm: connections, caches
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, run in paths.items():
                results[name].append(run())
        grpc_runs = results["gRPC Generate"]
        base_ttft, base_rate = (statistics.median(x[i] for x in grpc_runs) for i in (0, 1))
        print(f"{args.tokens} tokens, median of {args.rounds} rounds, {Path(config.model).name}")
        for name, values in results.items():
            ttft, rate = (statistics.median(x[i] for x in values) for i in (0, 1))
            print(
                f"  {name:15} first token {ttft:6.1f} ms ({ttft - base_ttft:+5.1f} ms)  "
                f"decode {rate:5.1f} tokens/s ({rate / base_rate:.3f}x)"
            )
        alone, with_page = idle_page_cpu(server.http_port, 10.0)
        print(
            f"server CPU over 10 s: {alone:.2f} s with no page, {with_page:.2f} s with an idle page"
        )
    finally:
        server.stop(drain=0)
    sys.exit(0)


if __name__ == "__main__":
    main()
