"""Cold start to SERVING: a first start (the CPU variant self-test runs), a start with the
verdicts remembered, and the code of an earlier commit (no self-test: its own choice of CPU
variant, and the variant the self-test picks), in turns.

    .venv/bin/python scripts/bench_startup.py [--model default] [--runs 5] [--baseline REV]

Each start is `edge-llm serve` in a new process, timed from its spawn until health says
SERVING (model loaded and warmed up); then it is stopped. The page cache is warm for all three
(the model is read once before the first run). The self-test's own time is read from the log.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from edge_llm import models

ROOT = Path(__file__).resolve().parent.parent


def start(model: Path, env: dict[str, str]) -> tuple[float, float | None, str]:
    """Seconds from spawn to SERVING, the self-test's seconds if it ran, the CPU variant."""
    state = tempfile.mkdtemp(prefix="edge-llm-bench-state-")
    cmd = [sys.executable, "-m", "edge_llm", "serve", "--model", str(model), "--port", "0"]
    began = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        cwd=state,
        env={**os.environ, "EDGE_LLM_STATE_DIR": state, **env},
    )
    lines: list[str] = []
    port: list[int] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"listening on \S+:(\d+)", line):
                port.append(int(m.group(1)))
                listening.set()
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    if not listening.wait(120) or not port:
        raise SystemExit("the server did not start:\n" + "".join(lines))
    with grpc.insecure_channel(f"127.0.0.1:{port[0]}") as channel:
        for response in HealthStub(channel).Watch(HealthCheckRequest(), timeout=300):
            if response.status == HealthCheckResponse.SERVING:
                break
    took = time.monotonic() - began
    proc.terminate()
    proc.wait(60)
    tested = [
        float(m.group(1)) for x in lines if (m := re.search(r"self-test: ran .* in ([0-9.]+) s", x))
    ]
    variant = next((m.group(1) for x in lines if (m := re.search(r"cpu backend: (\S+) ", x))), "?")
    return took, (tested[0] if tested else None), variant


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--baseline", default="5c2ae5f", help="commit without the self-test")
    args = p.parse_args()
    model = models.resolve(args.model)
    models.sha256_file(model)  # into the page cache

    baseline = Path(tempfile.mkdtemp(prefix="edge-llm-baseline-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", args.baseline, "edge_llm"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
    remembered = tempfile.mkdtemp(prefix="edge-llm-bench-cache-")
    chosen = start(model, {"XDG_CACHE_HOME": remembered})[2]  # the verdicts to remember

    envs = {
        "baseline": lambda: {"PYTHONPATH": str(baseline)},
        # The same variant as the self-test picks: what the self-test itself adds.
        "baseline, same variant": lambda: {
            "PYTHONPATH": str(baseline),
            "EDGE_LLM_CPU_VARIANT": chosen,
        },
        "remembered": lambda: {"XDG_CACHE_HOME": remembered},
        "first start": lambda: {"XDG_CACHE_HOME": tempfile.mkdtemp()},
    }
    times: dict[str, list[float]] = {name: [] for name in envs}
    variants: dict[str, str] = {}
    tests: list[float] = []
    for _ in range(args.runs):
        for name, env in envs.items():
            took, tested, variants[name] = start(model, env())
            times[name].append(took)
            if name == "first start":
                tests.append(tested or 0.0)

    base = statistics.median(times["baseline"])
    print(f"model {model.name}, {args.runs} runs each, median seconds from spawn to SERVING")
    for name, values in times.items():
        spread = f"{min(values):.2f}..{max(values):.2f}"
        print(
            f"  {name:22} {statistics.median(values):6.2f} s  ({spread})  "
            f"{statistics.median(values) / base:.2f}x baseline ({args.baseline}), "
            f"cpu {variants[name]}"
        )
    print(
        f"  self-test on a first start: median {statistics.median(tests):.2f} s "
        f"({min(tests):.2f}..{max(tests):.2f})"
    )


if __name__ == "__main__":
    main()
