"""Several streams at once: edge-llm's batched engine against llama.cpp's own llama-server.

Both servers run side by side (same model, 2 threads, one KV pool of 8192 cells shared by
`parallel` / `-np` sequences: llama-server with `-kvu`, its other settings its defaults) and
are asked in turns, the same requests through the same client: streaming POST
/v1/completions with temperature 0 and ignore_eos, so every stream makes exactly `--tokens`
tokens. Each request starts with its own number, so no KV cache is reused across requests.
Measured, per round and server:

- N streams: N requests at once; the aggregate decode rate while all N stream, and all tokens
  over the wall time (their prompts included);
- ttft beside 3: time to first token of a ~100-token request while 3 others stream (the
  median of every try: three per round);
- gap: the longest pause between two tokens of a running stream while a 2000-token prompt
  arrives, and that prompt's own time to first token.

Run through scripts/bench-batching (it builds the peer with scripts/build-peer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from bench import TASK  # scripts/bench.py's kiosk question, about 100 tokens

from edge_llm import models

_numbers = iter(range(1, 1_000_000))


def prompt(tokens: int = 0) -> str:
    """The task (about 100 tokens), or about `tokens` tokens of filler, after a fresh number."""
    n = next(_numbers)
    # "item42" is 2.9 tokens for Qwen2.5's tokenizer, with its space
    body = TASK if not tokens else " ".join(f"item{i % 97}" for i in range(int(tokens / 2.9)))
    return f"{n}. {body}\n\n"


@dataclass
class Stream:
    sent: float = 0.0
    times: list[float] = field(default_factory=list)  # one per streamed event with text

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent


def stream(
    base: str, text: str, tokens: int, on_token: Callable[[int], None] | None = None
) -> Stream:
    body = {
        "prompt": text,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    s = Stream(sent=time.perf_counter())
    with (
        httpx.Client(timeout=600) as client,
        client.stream("POST", f"{base}/v1/completions", json=body) as r,
    ):
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0].get("text"):
                s.times.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(s.times))
    return s


def at_once(base: str, n: int, tokens: int) -> tuple[float, float]:
    """n streams at once: all tokens / wall time (prompts included); and the decode rate
    while all n stream (tokens in the window from the last first token to the first last
    token, per second of it)."""
    results: list[Stream] = []
    start = time.perf_counter()
    threads = [
        threading.Thread(target=lambda: results.append(stream(base, prompt(), tokens)))
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    begin, end = max(s.times[0] for s in results), min(s.times[-1] for s in results)
    inside = sum(1 for s in results for x in s.times if begin < x <= end)
    return sum(len(s.times) for s in results) / wall, inside / (end - begin)


def ttft_beside(base: str, others: int, tokens: int) -> float:
    """Time to first token of one request while `others` streams are answering."""
    started = threading.Barrier(others + 1)
    threads: list[threading.Thread] = []
    streams: list[Stream] = []

    def other() -> None:
        def seen(k: int) -> None:
            if k == 1:
                started.wait()

        streams.append(stream(base, prompt(), tokens, seen))

    for _ in range(others):
        threads.append(threading.Thread(target=other))
        threads[-1].start()
    started.wait()  # every other stream has its first token
    measured = stream(base, prompt(), 8)
    for t in threads:
        t.join()
    if any(s.times[-1] < measured.times[0] for s in streams):
        sys.exit("an other stream ended before the measured first token: raise --tokens")
    return measured.ttft


def gap_while_long_prompt(base: str, prompt_tokens: int) -> tuple[float, float]:
    """The longest pause between two tokens of a running stream while a long prompt arrives
    (from its sending to its first token); and that prompt's time to first token."""
    talking = threading.Event()
    box: list[Stream] = []

    def seen(k: int) -> None:
        if k == 20:
            talking.set()

    def runner() -> None:
        box.append(stream(base, prompt(), 400, seen))

    t = threading.Thread(target=runner)
    t.start()
    talking.wait()
    long = stream(base, prompt(prompt_tokens), 1)
    t.join()
    times = [x for x in box[0].times if long.sent <= x <= long.times[0] + 1.0]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return max(gaps, default=0.0), long.ttft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(base: str, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"{what} did not become healthy")


def start_edge(model: Path, parallel: int, threads: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "edge_llm", "serve", "--model", str(model), "--port", "0",
        "--http-listen", f"127.0.0.1:{port}", "--parallel", str(parallel),
        "--threads", str(threads), "--threads-batch", str(threads),
        "--context-length", "8192", "--queue-depth", "16", "--max-tokens", "2048",
    ]  # fmt: skip
    env = {**os.environ, "EDGE_LLM_STATE_DIR": tempfile.mkdtemp(prefix="bench-state-")}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, "edge-llm")
    return base, proc


def start_peer(
    binary: Path, model: Path, parallel: int, threads: int
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-c", "8192", "-np", str(parallel), "-kvu", "-t", str(threads), "-tb", str(threads),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base, proc, "llama-server")
    return base, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--peer", type=Path, required=True, help="llama-server binary")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument(
        "--only", nargs="+", choices=("1", "4", "ttft", "gap", "8"), help="some measures only"
    )
    args = ap.parse_args()
    model = models.resolve(args.model)
    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, server: str, value: float) -> None:
        results.setdefault(name, {}).setdefault(server, []).append(value)
        print(f"{server}: {name} {value:.1f}", file=sys.stderr, flush=True)

    for parallel, every in ((4, ("1", "4", "ttft", "gap")), (8, ("8",))):
        scenarios = [what for what in every if not args.only or what in args.only]
        if not scenarios:
            continue
        servers = {
            "edge-llm": start_edge(model, parallel, args.threads),
            "llama-server": start_peer(args.peer, model, parallel, args.threads),
        }
        try:
            for base, _ in servers.values():  # warm both up: weights paged in
                stream(base, prompt(), 8)
            for r in range(args.rounds):
                for name, (base, _) in servers.items():
                    for what in scenarios:
                        if what.isdigit():
                            n = int(what)
                            overall, decode = at_once(base, n, args.tokens)
                            record(f"{n} streams: decode tokens/s, all streaming", name, decode)
                            record(f"{n} streams: tokens/s, prompts included", name, overall)
                        elif what == "ttft":
                            for _ in range(3):
                                ms = ttft_beside(base, 3, args.tokens) * 1e3
                                record("ttft beside 3 (ms)", name, ms)
                        else:
                            gap, ttft = gap_while_long_prompt(base, args.long_prompt)
                            record(f"longest gap, {args.long_prompt}-token prompt (ms)", name,
                                   gap * 1e3)  # fmt: skip
                            record(f"ttft of the {args.long_prompt}-token prompt (ms)", name,
                                   ttft * 1e3)  # fmt: skip
                print(f"np={parallel} round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for _, proc in servers.values():
                proc.terminate()
                proc.wait(60)

    print("| measure | edge-llm | llama-server | ratio |\n|---|---|---|---|")
    for name, by in results.items():
        ours, peer = statistics.median(by["edge-llm"]), statistics.median(by["llama-server"])
        print(f"| {name} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f}x |")
    print(json.dumps(results), file=sys.stderr)


if __name__ == "__main__":
    main()
