"""edge-llm on emulated ARM boards (scripts/test-arm64 runs this as root, on the host).

For each board, its CPU emulated by QEMU user mode inside the arm64 root of scripts/arm64-env:
  1. `doctor --board` on the board's fixture: the variant the board should get is chosen (its
     self-test passed, every better-scored one failed it), the fixture's flags point to the
     same, and the board's threads and memory plan are reported;
  2. a variant the CPU cannot run, asked for by name, is refused with a message, never loaded;
  3. `edge-llm serve` on the tiny model in the root, streamed over gRPC by the host's (x86_64)
     `edge-llm generate`; `info` names the variant; SIGTERM stops it cleanly;
  4. the unit tests that do not depend on timing, inside the root (on the first board only:
     they take most of the time under emulation).
Timings under emulation mean nothing: only behaviour is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))

from edge_llm import hardware  # noqa: E402

ARM64_ENV = CHECKOUT / "scripts" / "arm64-env"
BOARDS_DIR = CHECKOUT / "tests" / "fixtures" / "boards"
MODELS_IN_ROOT = "/root/.cache/edge-llm/models"  # where `arm64-env run` mounts this machine's


@dataclass(frozen=True)
class Board:
    cpu: str  # QEMU_CPU
    fixture: str  # tests/fixtures/boards/<fixture>
    variant: str  # what it should run
    unrunnable: str  # a variant its CPU lacks instructions for


BOARDS = {
    "pi4": Board("cortex-a72", "raspberry-pi-4", "armv8.0_1", "armv8.2_1"),  # Armv8.0
    "pi5": Board("cortex-a76", "raspberry-pi-5", "armv8.2_2", "armv8.2_3"),  # dotprod, fp16
    # Armv9.0 (Neoverse N2 class): SVE2 and int8 matmul, no SME. QEMU 7.2 has no neoverse-n2
    # model; `max` without SME has the same features as far as ggml's variants go.
    "cobalt": Board("max,sme=off", "azure-cobalt-100-4vcpu", "armv8.6_2", "armv9.2_1"),
}
# Test modules run inside the root: no browser, no systemd, no timing; what differs on ARM
# (variants, KV cache state, the engine, conversions) included.
UNIT_TESTS = [
    "tests/test_backend.py",
    "tests/test_hardware.py",
    "tests/test_memory.py",
    "tests/test_config.py",
    "tests/test_textstream.py",
    "tests/test_validation.py",
    "tests/test_proto.py",
    "tests/test_admission.py",
    "tests/test_generate.py",
    "tests/test_sessions.py",
]


class Failed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)
    print(f"  ok   {what}", flush=True)


def in_root(board: Board, *command: str, cache: str, **popen: Any) -> subprocess.Popen[str]:
    """`command` in the arm64 root on the board's emulated CPU."""
    inner_env = [f"EDGE_LLM_MODELS_DIR={MODELS_IN_ROOT}", f"XDG_CACHE_HOME={cache}"]
    return subprocess.Popen(
        [str(ARM64_ENV), "run", "env", *inner_env, *command],
        env={**os.environ, "QEMU_CPU": board.cpu},
        text=True,
        **popen,
    )


def run_in_root(board: Board, *command: str, cache: str, timeout: float) -> tuple[int, str, str]:
    proc = in_root(board, *command, cache=cache, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: Path, text: str, proc: subprocess.Popen[str], timeout: float) -> None:
    """Until `text` appears in the log at `path` (or the process ends, or the time is up)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = path.read_text(errors="replace")[-3000:]
            raise Failed(f"no {text!r} in the server's log; its end:\n{tail}")
        time.sleep(0.5)


def doctor(board: Board, cache: str) -> None:
    fixture = BOARDS_DIR / board.fixture
    code, out, err = run_in_root(
        board, "python3", "-m", "edge_llm", "doctor", "--json", "--model", "tiny",
        "--board", str(fixture), cache=cache, timeout=1800,
    )  # fmt: skip
    check(code == 0, f"doctor --board {board.fixture} runs" + (f": {err[-2000:]}" if code else ""))
    report = json.loads(out)
    recorded = hardware.detect(fixture)
    check(report["board"]["model"] == recorded.model, f"board: {recorded.model}")
    cpu = report["cpu_backend"]
    print(f"       scores {cpu['scores']}; rejected {cpu['rejected'] or 'none'}")
    check(cpu["variant"] == board.variant, f"variant {cpu['variant']} (expected {board.variant})")
    check(
        cpu["expected_from_cpu_flags"] == board.variant,
        f"the fixture's flags point to {cpu['expected_from_cpu_flags']} too",
    )
    better = [v for v, s in cpu["scores"].items() if s > cpu["scores"][board.variant]]
    check(
        all(v in cpu["rejected"] for v in better),
        f"every better-scored variant failed its self-test: {better or 'none'}",
    )
    threads = hardware.plan_threads(recorded)
    check(
        report["threads"]["generation"] == threads.generation and "memory" in report,
        f"threads {threads.generation} ({threads.why}); plan: {report['memory']['summary']}",
    )
    code, out, err = run_in_root(
        board, "python3", "-m", "edge_llm", "doctor", "--json", "--model", "tiny",
        "--cpu-variant", board.unrunnable, cache=cache, timeout=1800,
    )  # fmt: skip
    refused = [w for w in json.loads(out)["warnings"] if board.unrunnable in w] if code == 0 else []
    check(
        bool(refused) and "cannot run" in refused[0],
        f"{board.unrunnable} refused: {refused[0] if refused else err[-2000:]}",
    )


def serve_and_generate(name: str, board: Board, cache: str, host_cli: Path) -> None:
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix=f"arm64-{name}-", suffix=".log") as log:
        server = in_root(
            board, "python3", "-m", "edge_llm", "serve", "--model", "tiny", "--port", str(port),
            "--http-listen", "", "--context-length", "1024", cache=cache,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(Path(log.name), "ready:", server, timeout=1800)
            address = ["--address", f"127.0.0.1:{port}"]
            info = subprocess.run(
                [str(host_cli), "info", "--json", *address],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            check(info.returncode == 0, f"the host's edge-llm info reaches it {info.stderr[-500:]}")
            runtime = json.loads(info.stdout)["runtime"]
            check(
                runtime["cpuVariant"] == board.variant,
                f"serving on {runtime['cpuVariant']}, {runtime['threads']} threads",
            )
            # A plain completion whose greedy answer every variant and x86 agree on (a chat
            # answer of this tiny model differs between variants: flash attention in fp16).
            answer = subprocess.run(
                [str(host_cli), "generate", "--raw", "The capital of France is",
                 "--max-tokens", "4", "--temperature", "0", *address],
                capture_output=True, text=True, timeout=1800,
            )  # fmt: skip
            check(
                answer.returncode == 0 and "Paris" in answer.stdout,
                f"streamed to the host over gRPC: {answer.stdout.strip()!r} {answer.stderr[-500:]}",
            )
            os.killpg(server.pid, signal.SIGTERM)
            wait_for(Path(log.name), "stopped", server, timeout=600)
            check(True, "SIGTERM: stopped")
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def unit_tests(board: Board, cache: str) -> None:
    proc = in_root(
        # pytest-timeout's 300 s per test is a hang guard sized for native speed.
        board, "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "3000",
        *UNIT_TESTS,
        cache=cache,
    )  # fmt: skip
    check(proc.wait(timeout=3 * 3600) == 0, f"unit tests in the root: {' '.join(UNIT_TESTS)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("boards", nargs="*", help=f"of {', '.join(BOARDS)} (default: all)")
    parser.add_argument("--no-unit-tests", action="store_true")
    args = parser.parse_args()
    if unknown := [b for b in args.boards if b not in BOARDS]:
        parser.error(f"unknown boards {unknown}; the boards are {', '.join(BOARDS)}")
    host_cli = Path(sys.executable).parent / "edge-llm"
    results: dict[str, str] = {}
    started = time.monotonic()
    for i, name in enumerate(args.boards or BOARDS):
        board = BOARDS[name]
        print(f"{name}: {board.fixture} on QEMU's {board.cpu}", flush=True)
        board_start = time.monotonic()
        cache = f"/tmp/edge-llm-test-{name}"  # in the root: a verdict cache of its own
        try:
            doctor(board, cache)
            serve_and_generate(name, board, cache, host_cli)
            if i == 0 and not args.no_unit_tests:
                unit_tests(board, cache)
            results[name] = f"PASS ({time.monotonic() - board_start:.0f} s)"
        except (Failed, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as e:
            print(f"  FAIL {e}", flush=True)
            results[name] = "FAIL"
    print(f"\nscripts/test-arm64, {time.monotonic() - started:.0f} s:")
    for name, result in results.items():
        print(f"  {name:7} {BOARDS[name].cpu:12} {result}")
    return 0 if all(r.startswith("PASS") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
