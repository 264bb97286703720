"""The all-variants llama.cpp build: a CPU variant is used only once it passed its self-test.

Nothing here depends on ggml's first choice running: a variant that crashes is what the
self-test is for, and a fake one that claims the top score and dies proves the fallback on any
machine. Every variant that might crash runs in a child process, never in pytest's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from helpers import HANG_GUARD, ServeProcess

from edge_llm import backend, cpucheck, hardware
from edge_llm.engine import cpu_features_used, system_info
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not backend.variants(), reason="a one-variant (native) build")

# An instruction this CPU does not have: SIGILL. (__builtin_trap is x86's ud2, but on ARM a
# brk, which is SIGTRAP: there, an undefined instruction.)
ILLEGAL = (
    '__asm__ volatile(".inst 0x00000000")'
    if platform.machine() == "aarch64"
    else "__builtin_trap()"
)
# Claims a score above every real variant and dies with SIGILL when ggml initialises it, as a
# variant using instructions the CPU only claims to have would.
CRASHING_VARIANT = f"""
int ggml_backend_score(void) {{ return 1 << 24; }}
void *ggml_backend_init(void) {{ {ILLEGAL}; return 0; }}
"""


def edge_llm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edge-llm ARGS` in a process of its own: a variant that crashes takes only that down."""
    command = [sys.executable, "-m", "edge_llm", *args]
    env = {**os.environ, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def doctor(*args: str, env: dict[str, str] | None = None) -> dict:
    result = edge_llm("doctor", "--json", *args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def crashing_top(tmp_path: Path) -> dict[str, str]:
    """The environment of a process whose llama_cpp is the real one, but whose variants are the
    real ones plus `crashy`, which scores highest and dies (a site-packages of symlinks), and
    whose verdict cache is new."""
    site = tmp_path
    lib_dir, _ = backend._dirs()
    (site / "llama_cpp").symlink_to(lib_dir.parent)
    (site / "bin").mkdir()
    for path in backend.variants().values():
        (site / "bin" / path.name).symlink_to(path)
    compile_variant(CRASHING_VARIANT, site / "bin" / f"{backend.PREFIX}crashy.so")
    return {"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(site / "cache")}


def compile_variant(source: str, lib: Path) -> Path:
    c = lib.with_suffix(".c")
    c.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(c)], check=True)
    return lib


def test_the_build_carries_every_variant() -> None:
    names = set(backend.variants())
    if platform.machine() == "x86_64":
        assert {"x64", "sse42", "haswell", "skylakex", "icelake", "zen4"} <= names


def test_the_chosen_variant_passed_and_every_better_scored_one_failed(tiny_model, tmp_path):
    cpu = doctor("--model", str(tiny_model), env={"XDG_CACHE_HOME": str(tmp_path)})["cpu_backend"]
    scores, chosen = cpu["scores"], cpu["variant"]
    assert chosen not in cpu["rejected"]
    better = {v for v, s in scores.items() if s > scores[chosen]}
    assert better == set(cpu["rejected"]), "a better variant was skipped without a cause"
    assert all(cause for cause in cpu["rejected"].values())
    assert cpu["self_test"] == "tested now"
    assert "passed a self-test" in cpu["why"]


def test_ggml_scores_highest_what_the_cpu_flags_call_for() -> None:
    """ggml's score (what the CPU claims) agrees with our flag table; whether that variant
    runs is the self-test's business."""
    scores = backend.load().scores
    expected = hardware.expected_variant(hardware.detect())
    assert expected is not None and scores[expected] == max(scores.values())


def test_top_variant_crashing_falls_back_and_says_why(tiny_model: Path, crashing_top) -> None:
    cpu = doctor("--model", str(tiny_model), env=crashing_top)["cpu_backend"]
    assert cpu["variant"] != "crashy"
    assert cpu["rejected"]["crashy"] == "killed by SIGILL during loading the variant"
    assert cpu["self_test"] == "tested now"
    text = edge_llm("doctor", "--model", str(tiny_model), env=crashing_top).stdout
    assert "rejected  crashy: killed by SIGILL during loading the variant" in text
    # The verdicts are remembered: the next start runs no child, and still says why.
    again = doctor("--model", str(tiny_model), env=crashing_top)["cpu_backend"]
    assert again["self_test"] == "verdict remembered"
    assert (again["variant"], again["rejected"]) == (cpu["variant"], cpu["rejected"])


def test_serving_falls_back_from_a_crashing_variant_and_answers(tiny_model, crashing_top) -> None:
    server = ServeProcess(tiny_model, env=crashing_top)
    try:
        server.wait_until_serving()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            runtime = stub.GetInfo(pb.GetInfoRequest(), timeout=30).runtime
            assert runtime.cpu_variant != "crashy"
            assert "SIGILL" in runtime.cpu_variants_rejected["crashy"]
            request = pb.GenerateRequest(prompt="Once upon", max_tokens=5, ignore_eos=True)
            last = list(stub.Generate(request, timeout=60))[-1]
            assert last.usage.completion_tokens == 5
        assert "crashy is not used: its self-test failed (killed by SIGILL" in server.log
        info = subprocess.run(
            [sys.executable, "-m", "edge_llm", "info", "--address", f"127.0.0.1:{server.port}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"backend  {runtime.cpu_variant} (the best-scored variant that passed" in info
        assert "rejected crashy: killed by SIGILL during loading the variant" in info
    finally:
        server.kill()


def test_a_forced_variant_that_fails_is_refused_with_those_that_pass(tiny_model, crashing_top):
    serve = ("serve", "--model", str(tiny_model), "--port", "0", "--cpu-variant", "crashy")
    result = edge_llm(*serve, env=crashing_top)
    assert result.returncode == 1
    assert "the crashy variant failed its self-test on this CPU: killed by SIGILL" in result.stderr
    passed = result.stderr.split("variants that passed: ")[1].split(" (")[0].split(", ")
    assert backend.load().variant in passed
    assert "Traceback" not in result.stderr


def test_a_changed_build_is_tested_again(tiny_model: Path, crashing_top) -> None:
    doctor("--model", str(tiny_model), env=crashing_top)
    lib = Path(crashing_top["PYTHONPATH"]) / "bin" / f"{backend.PREFIX}crashy.so"
    os.utime(lib, ns=(lib.stat().st_atime_ns, lib.stat().st_mtime_ns + 1_000_000_000))
    assert doctor("--model", str(tiny_model), env=crashing_top)["cpu_backend"]["self_test"] == (
        "tested now"
    )


def test_a_prompt_sized_batch_and_a_long_answer_run_on_the_chosen_variant(tiny_model) -> None:
    """The failure this guards against: a variant that survives a 1-token warm-up and dies on
    the first real prompt. In a child process, so a crash fails this test, not the run."""
    server = ServeProcess(tiny_model, "--batch-size", "256")
    try:
        server.wait_until_serving()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            prompt = "Tell me about the sea, the ships and the harbour. " * 30
            request = pb.GenerateRequest(prompt=prompt, max_tokens=200, ignore_eos=True)
            # A second here; ten minutes for Armv8.0 under QEMU on a busy host.
            last = list(stub.Generate(request, timeout=3 * HANG_GUARD))[-1]
        assert last.usage.prompt_tokens >= 300
        assert last.usage.completion_tokens == 200
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        server.kill()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 variant names")
def test_an_older_variant_can_be_forced(tiny_model: Path) -> None:
    cpu = doctor("--model", str(tiny_model), "--cpu-variant", "haswell")["cpu_backend"]
    assert cpu["variant"] == "haswell"
    assert "forced by configuration; it passed its self-test, tested now" in cpu["why"]
    assert "AVX2" in cpu["uses"] and "AVX512" not in cpu["uses"]


def test_a_variant_the_cpu_cannot_run_is_refused_not_crashed(tiny_model: Path) -> None:
    scores = backend.load().scores
    unrunnable = [v for v, s in scores.items() if s == 0]
    if not unrunnable:
        pytest.skip("this CPU runs every variant of the build")
    report = doctor("--model", str(tiny_model), "--cpu-variant", unrunnable[0])
    assert any(f"cannot run the {unrunnable[0]} variant" in w for w in report["warnings"])


def test_unknown_variant_names_the_known_ones(tiny_model: Path) -> None:
    report = doctor("--model", str(tiny_model), "--cpu-variant", "pentium")
    assert any("unknown CPU variant 'pentium'" in w for w in report["warnings"])


def test_server_reports_its_variant(stub) -> None:
    runtime = stub.GetInfo(pb.GetInfoRequest()).runtime
    loaded = backend.load()
    assert runtime.cpu_variant == loaded.variant
    assert dict(runtime.cpu_variants_rejected) == loaded.rejected
    assert runtime.cpu_variant_reason


def test_serve_refuses_a_variant_the_cpu_cannot_run(tiny_model: Path) -> None:
    scores = backend.load().scores
    unrunnable = [v for v, s in scores.items() if s == 0]
    if not unrunnable:
        pytest.skip("this CPU runs every variant of the build")
    result = edge_llm(
        "serve", "--model", str(tiny_model), "--port", "0", "--cpu-variant", unrunnable[0]
    )
    assert result.returncode == 1
    assert f"cannot run the {unrunnable[0]} variant" in result.stderr
    assert "Traceback" not in result.stderr


# -- the self-test's parts --------------------------------------------------------------------


def test_the_cases_are_the_models_weight_matrices(tiny_model: Path) -> None:
    lib_dir, _ = backend._dirs()
    cases = cpucheck.model_cases(lib_dir, tiny_model)
    names = {cpucheck.type_name(cpucheck._ggml(lib_dir), c.type) for c in cases}
    assert "q4_1" in names  # SmolLM2-135M Q4_1
    assert cpucheck.F32 not in {c.type for c in cases}
    assert all(c.rows <= 256 and c.k % 32 == 0 for c in cases)
    # 576-wide (SmolLM2's embedding) rows: 576 % 128 = 64, kept.
    assert any(c.k == 576 for c in cases)


@pytest.mark.parametrize(
    ("body", "failure"),
    [
        (f"{ILLEGAL};", "killed by SIGILL during loading the variant"),
        # ggml's GGML_ASSERT: a message on stderr, then abort(); the message is the cause.
        (
            'fprintf(stderr, "repack.cpp:42: GGML_ASSERT(n % 8 == 0) failed\\n"); abort();',
            "killed by SIGABRT during loading the variant (repack.cpp:42: GGML_ASSERT(n % 8 == 0) "
            "failed)",
        ),
        ("for (;;) {}", "did not finish in 5 s during loading the variant"),
    ],
)
def test_how_a_variant_fails_is_told(tmp_path, monkeypatch, body: str, failure: str) -> None:
    monkeypatch.setattr(cpucheck, "TIMEOUT", 5)
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # as under the systemd unit
    source = f"#include <stdio.h>\n#include <stdlib.h>\nvoid *ggml_backend_init(void) {{ {body} }}"
    lib = compile_variant(source, tmp_path / "libggml-cpu-bad.so")
    lib_dir, _ = backend._dirs()
    assert cpucheck.Trial(lib_dir, lib, cpucheck.DEFAULT_CASES).outcome().failure == failure


def test_a_variant_that_crashes_when_scored_scores_zero(tmp_path: Path) -> None:
    boom = f"__attribute__((constructor)) static void boom(void) {{ {ILLEGAL}; }}"
    lib = compile_variant(boom, tmp_path / f"{backend.PREFIX}boom.so")
    lib_dir, _ = backend._dirs()
    real = backend.variants()
    plainest = min(backend.load().scores.items(), key=lambda kv: kv[1] or 1 << 30)[0]
    found = {"boom": lib, plainest: real[plainest]}
    assert cpucheck.scores(lib_dir, found) == {"boom": 0, plainest: backend.load().scores[plainest]}


def test_wrong_numbers_are_caught() -> None:
    ref = np.arange(1, 201, dtype=np.float32).reshape(2, 100)
    reference = cpucheck.Outcome({"q4_K/256/100/2/CPU": ref})

    def candidate(amx: np.ndarray, plain: np.ndarray = ref) -> cpucheck.Outcome:
        return cpucheck.Outcome({"q4_K/256/100/2/CPU": plain, "q4_K/256/100/2/AMX": amx})

    assert cpucheck.differs(candidate(ref * 1.001), reference) == ""
    for bad in (ref * 0, ref * np.nan, ref[::-1].copy()):
        cause = cpucheck.differs(candidate(bad), reference)
        assert cause.startswith("wrong numbers in a 2-token q4_K matmul with AMX weights")
    # A case the candidate skipped, or one the reference never ran, is not a pass.
    skipped = cpucheck.Outcome({"q4_K/256/100/2/AMX": ref})
    assert cpucheck.differs(skipped, reference) == "did not run a 2-token q4_K matmul"
    extra = cpucheck.Outcome({**candidate(ref).results, "q6_K/256/100/1/CPU": ref[:1]})
    assert "which the reference could not" in cpucheck.differs(extra, reference)


def test_verdicts_are_kept_per_key_and_survive_an_unwritable_cache(tmp_path: Path) -> None:
    path = tmp_path / "cpu-variants.json"
    v = cpucheck.Verdicts(path, "k1")
    assert v.scores is None and v.outcomes == {}
    v.scores, v.outcomes = {"zen4": 7}, {"zen4": "", "sapphirerapids": "killed by SIGILL"}
    assert v.save() == ""
    again = cpucheck.Verdicts(path, "k1")
    assert (again.scores, again.outcomes) == (v.scores, v.outcomes)
    assert cpucheck.Verdicts(path, "k2").outcomes == {}
    path.write_text("{not json")
    assert cpucheck.Verdicts(path, "k1").outcomes == {}  # a damaged file: test again
    (tmp_path / "a-file").write_text("")
    assert "a-file" in cpucheck.Verdicts(tmp_path / "a-file" / "v.json", "k").save()


# -- what is remembered, with stand-in children (the logic only; the real ones are above) -----

GOOD = cpucheck.Outcome({"q8_0/256/128/1/CPU": np.ones((1, 128))})


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Three variants (x64 < mid < top) whose children give the outcomes the test sets."""
    found = {name: tmp_path / f"{backend.PREFIX}{name}.so" for name in ("x64", "mid", "top")}
    for path in found.values():
        path.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    lib_dir, _ = backend._dirs()
    memory = cpucheck.Verdicts(cpucheck.verdict_file(), cpucheck.key(lib_dir, found, None))
    memory.scores = {"x64": 1, "mid": 2, "top": 3}
    memory.save()
    outcomes: dict[str, cpucheck.Outcome] = {}
    runs: list[str] = []

    class StandIn:
        def __init__(self, _lib: Path, path: Path, _cases: object) -> None:
            self.name = path.stem.removeprefix(backend.PREFIX)
            runs.append(self.name)

        def outcome(self) -> cpucheck.Outcome:
            return outcomes[self.name]

        def close(self) -> None:
            pass

    monkeypatch.setattr(cpucheck, "Trial", StandIn)

    def choose(variant: str = "auto") -> tuple[backend.CpuBackend, dict[str, str], list[str]]:
        runs.clear()
        chosen = backend._choose(lib_dir, found, variant, None)
        remembered = cpucheck.Verdicts(memory.path, memory.key).outcomes
        return chosen, remembered, list(runs)

    return outcomes, choose


def test_a_timeout_is_not_remembered_a_crash_is(stand_ins) -> None:
    outcomes, choose = stand_ins
    outcomes.update(
        top=cpucheck.Outcome({}, "did not finish in 30 s", lasting=False), mid=GOOD, x64=GOOD
    )
    chosen, remembered, runs = choose()
    assert chosen.variant == "mid" and chosen.rejected == {"top": "did not finish in 30 s"}
    assert remembered == {"mid": ""}
    assert sorted(runs) == ["mid", "top", "x64"]
    outcomes["top"] = cpucheck.Outcome({}, "killed by SIGILL during x")
    chosen, remembered, runs = choose()
    assert remembered == {"mid": "", "top": "killed by SIGILL during x"}
    chosen, remembered, runs = choose()
    assert (chosen.variant, chosen.tested, runs) == ("mid", "verdict remembered", [])


def test_a_pass_not_compared_with_the_reference_is_not_remembered(stand_ins) -> None:
    outcomes, choose = stand_ins
    outcomes.update(top=GOOD, x64=cpucheck.Outcome({}, "killed by SIGSEGV during y"))
    chosen, remembered, _ = choose()
    assert chosen.variant == "top" and remembered == {}


def test_when_nothing_passes_nothing_is_remembered(stand_ins) -> None:
    outcomes, choose = stand_ins
    for name in ("top", "mid", "x64"):
        outcomes[name] = cpucheck.Outcome({}, f"killed by SIGILL in {name}")
    with pytest.raises(backend.BackendError, match="no CPU variant passed its self-test"):
        choose()
    memory = json.loads(cpucheck.verdict_file().read_text())
    assert [entry["outcomes"] for entry in memory.values()] == [{}]


def test_the_reference_runs_once_even_as_the_last_candidate(stand_ins) -> None:
    outcomes, choose = stand_ins
    outcomes.update(
        top=cpucheck.Outcome({}, "killed by SIGILL"),
        mid=cpucheck.Outcome({}, "killed by SIGBUS"),
        x64=GOOD,
    )
    chosen, remembered, runs = choose()
    assert chosen.variant == "x64" and sorted(runs) == ["mid", "top", "x64"]
    assert remembered == {"top": "killed by SIGILL", "mid": "killed by SIGBUS", "x64": ""}


def test_a_forced_variant_that_fails_names_those_that_pass(stand_ins) -> None:
    outcomes, choose = stand_ins
    outcomes.update(top=cpucheck.Outcome({}, "killed by SIGILL"), mid=GOOD, x64=GOOD)
    with pytest.raises(backend.BackendError, match=r"top variant failed .*passed: mid, x64"):
        choose("top")
    chosen, _, runs = choose("mid")
    assert chosen.forced and chosen.variant == "mid" and runs == []


@pytest.mark.parametrize(
    ("env", "shown"),
    [
        ({}, "GOMP_SPINCOUNT = '2000'"),  # a short spin: fair to whatever else runs on the board
        ({"OMP_WAIT_POLICY": "active"}, "OMP_WAIT_POLICY = 'ACTIVE'"),  # the operator's choice
        ({"GOMP_SPINCOUNT": "50"}, "GOMP_SPINCOUNT = '50'"),
    ],
)
def test_openmp_waits_briefly_unless_told_otherwise(env: dict[str, str], shown: str) -> None:
    """The server imports the engine before anything else loads libgomp, which reads its wait
    policy once: what it shows at load (OMP_DISPLAY_ENV) is what the threads do."""
    backend.load()
    if "OPENMP" not in cpu_features_used(system_info()):
        pytest.skip("a build without OpenMP (ggml's own thread pool): no wait policy to set")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    result = subprocess.run(
        [sys.executable, "-c", "import edge_llm.server"],
        env={**base, **env, "OMP_DISPLAY_ENV": "verbose"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown in result.stderr
    if env:
        assert "GOMP_SPINCOUNT = '2000'" not in result.stderr


def test_doctor_reports_for_a_recorded_board(tiny_model: Path) -> None:
    """--board DIR: the board's CPUs, threads and memory; the CPU variant still tried here."""
    boards = Path(__file__).parent / "fixtures" / "boards"
    same, other = (
        ("intel-i5-8250u", "raspberry-pi-5")
        if platform.machine() == "x86_64"
        else ("raspberry-pi-5", "intel-i5-8250u")
    )
    recorded = hardware.detect(boards / same)
    report = doctor("--model", str(tiny_model), "--board", str(boards / same))
    assert report["board"]["model"] == recorded.model
    assert report["board"]["cpus"] == [c.id for c in recorded.cpus]
    assert report["threads"]["generation"] == hardware.plan_threads(recorded).generation
    assert (
        report["cpu_backend"]["variant"]
        == doctor("--model", str(tiny_model))["cpu_backend"]["variant"]
    )
    refused = edge_llm("doctor", "--model", str(tiny_model), "--board", str(boards / other))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"this machine is {platform.machine()}" in refused.stderr
