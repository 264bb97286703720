"""The all-variants llama.cpp build: the right CPU variant is chosen, forced, or refused."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llm import backend

pytestmark = pytest.mark.skipif(not backend.variants(), reason="a one-variant (native) build")


def doctor(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "edge_llm", "doctor", "--json", *args],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_build_carries_every_variant() -> None:
    names = set(backend.variants())
    if platform.machine() == "x86_64":
        assert {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4"} <= names


def test_auto_picks_the_best_variant_this_cpu_runs(tiny_model: Path) -> None:
    report = doctor("--model", str(tiny_model))
    cpu = report["cpu_backend"]
    scores = cpu["scores"]
    assert cpu["variant"] == max(scores, key=scores.get)
    flags = set(report["board"]["features"])
    if {"avx512f", "avx512_vnni", "avx512_bf16"} <= flags:  # this machine: Zen 5 / Cooper Lake+
        assert cpu["variant"] in ("zen4", "cooperlake", "sapphirerapids")
        assert "AVX512_BF16" in cpu["uses"]
    elif "avx2" in flags:
        assert scores[cpu["variant"]] >= scores["haswell"]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 variant names")
def test_an_older_variant_can_be_forced(tiny_model: Path) -> None:
    cpu = doctor("--model", str(tiny_model), "--cpu-variant", "haswell")["cpu_backend"]
    assert cpu["variant"] == "haswell"
    assert "AVX2" in cpu["uses"] and "AVX512" not in cpu["uses"]


def test_a_variant_the_cpu_cannot_run_is_refused_not_crashed(tiny_model: Path) -> None:
    scores = doctor("--model", str(tiny_model))["cpu_backend"]["scores"]
    unrunnable = [v for v, s in scores.items() if s == 0]
    if not unrunnable:
        pytest.skip("this CPU runs every variant of the build")
    report = doctor("--model", str(tiny_model), "--cpu-variant", unrunnable[0])
    assert any(f"cannot run the {unrunnable[0]} variant" in w for w in report["warnings"])


def test_unknown_variant_names_the_known_ones(tiny_model: Path) -> None:
    report = doctor("--model", str(tiny_model), "--cpu-variant", "pentium")
    assert any("unknown CPU variant 'pentium'" in w for w in report["warnings"])


def test_server_reports_its_variant(stub) -> None:
    from edge_llm.v1 import edge_llm_pb2 as pb

    runtime = stub.GetInfo(pb.GetInfoRequest()).runtime
    assert runtime.cpu_variant == backend.load().variant
    assert runtime.cpu_variant_reason


def test_serve_refuses_a_variant_the_cpu_cannot_run(tiny_model: Path) -> None:
    scores = backend.load().scores
    unrunnable = [v for v, s in scores.items() if s == 0]
    if not unrunnable:
        pytest.skip("this CPU runs every variant of the build")
    result = subprocess.run([sys.executable, "-m", "edge_llm", "serve", "--model", str(tiny_model),
                             "--port", "0", "--cpu-variant", unrunnable[0]],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert f"cannot run the {unrunnable[0]} variant" in result.stderr
    assert "Traceback" not in result.stderr
