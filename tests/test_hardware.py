"""Board detection and thread choice on recorded and documented board files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_llm import hardware

BOARDS = Path(__file__).parent / "fixtures" / "boards"
GIB = 1024**3


def board(name: str) -> hardware.Board:
    return hardware.detect(BOARDS / name)


@pytest.mark.parametrize(
    ("name", "arch", "cpus", "generation", "prompt"),
    [
        ("raspberry-pi-4", "aarch64", 4, 4, 4),
        ("raspberry-pi-5", "aarch64", 4, 4, 4),
        # big.LITTLE: generation on the 4 Cortex-A76 only; prompt on all, capped by the quota.
        ("rk3588-orange-pi-5", "aarch64", 8, 4, 6),
        ("azure-cobalt-100-4vcpu", "aarch64", 4, 4, 4),
        # 4 cores / 8 threads: one thread per physical core.
        ("intel-i5-8250u", "x86_64", 8, 4, 4),
        ("epyc-zen5-2core", "x86_64", 2, 2, 2),
        ("xeon-amx-2core", "x86_64", 2, 2, 2),
    ],
)
def test_threads(name: str, arch: str, cpus: int, generation: int, prompt: int) -> None:
    b = board(name)
    assert b.arch == arch
    assert len(b.cpus) == cpus
    threads = hardware.plan_threads(b)
    assert (threads.generation, threads.prompt) == (generation, prompt), threads.why


def test_cpu_features() -> None:
    assert "asimddp" not in board("raspberry-pi-4").features  # Cortex-A72: no dot product
    assert "asimddp" in board("raspberry-pi-5").features
    i5 = board("intel-i5-8250u").features
    assert {"avx2", "fma", "f16c", "bmi2"} <= i5 and "avx512f" not in i5
    assert {"avx512f", "avx512_vnni", "avx512_bf16"} <= board("epyc-zen5-2core").features


def test_board_names_and_clusters() -> None:
    assert board("raspberry-pi-4").model == "Raspberry Pi 4 Model B Rev 1.4 (4x Cortex-A72)"
    rk = board("rk3588-orange-pi-5")
    assert rk.model == "Orange Pi 5 (4x Cortex-A55 + 4x Cortex-A76)"
    assert [c.id for c in rk.big_cpus] == [4, 5, 6, 7]
    assert {c.name for c in rk.big_cpus} == {"Cortex-A76"}


def test_cgroup_limits_take_the_tightest_ancestor() -> None:
    pi = board("raspberry-pi-4")
    assert pi.mem_limit == 1932735488  # memory.high below memory.max=2G
    assert pi.cpu_quota is None  # cpu.max "max"
    rk = board("rk3588-orange-pi-5")
    assert rk.mem_limit == 2 * GIB  # the pod's 2 GiB, not the slice's 16 GB
    assert rk.cpu_quota == 6.0
    assert board("intel-i5-8250u").mem_limit is None


def test_cgroup_v1_limits_on_a_hybrid_system(tmp_path: Path) -> None:
    """Memory and CPU on v1 hierarchies, an empty unified one beside them (systemd's hybrid
    mode, older boards): MemoryMax= and CPUQuota= still reach the plan."""
    root = tmp_path / "hybrid"
    shutil.copytree(BOARDS / "raspberry-pi-4", root)
    service = "system.slice/edge-llm.service"
    (root / "proc/self/cgroup").write_text(
        f"7:memory:/{service}\n4:cpu,cpuacct:/{service}\n1:name=systemd:/{service}\n0::/\n"
    )
    shutil.rmtree(root / "sys/fs/cgroup")
    files = {
        f"memory/{service}/memory.limit_in_bytes": "2147483648",
        "memory/system.slice/memory.limit_in_bytes": "9223372036854771712",  # no limit
        f"cpu,cpuacct/{service}/cpu.cfs_quota_us": "150000",
        f"cpu,cpuacct/{service}/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1",
        "cpu,cpuacct/cpu.cfs_period_us": "100000",
    }
    for name, text in files.items():
        path = root / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    b = hardware.detect(root)
    assert b.mem_limit == 2 * GIB
    assert b.cpu_quota == 1.5


def test_memory_available() -> None:
    assert board("raspberry-pi-4").mem_available == 3512000 * 1024


def test_affinity_limits_the_cpus(tmp_path: Path) -> None:
    root = tmp_path / "rk"
    shutil.copytree(BOARDS / "rk3588-orange-pi-5", root)
    (root / "proc/self/status").write_text("Name:\tx\nCpus_allowed_list:\t0-3,6\n")
    b = hardware.detect(root)
    assert [c.id for c in b.cpus] == [0, 1, 2, 3, 6]
    assert hardware.plan_threads(b).generation == 1  # one big core left


def test_missing_files_still_give_a_usable_answer(tmp_path: Path) -> None:
    b = hardware.detect(tmp_path)
    assert hardware.plan_threads(b).generation >= 1


def test_the_live_machine_reads() -> None:
    b = hardware.detect()
    assert b.cpus and hardware.plan_threads(b).generation >= 1


def test_board_warnings() -> None:
    assert any("swap is on" in w for w in board("raspberry-pi-4").warnings)
    assert any("'powersave'" in w for w in board("rk3588-orange-pi-5").warnings)
    assert board("epyc-zen5-2core").warnings == ()


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("raspberry-pi-4", "armv8.0_1"),  # Cortex-A72: no dot product, no fp16 arithmetic
        ("raspberry-pi-5", "armv8.2_2"),  # Cortex-A76: dotprod + fp16
        ("rk3588-orange-pi-5", "armv8.2_2"),
        ("azure-cobalt-100-4vcpu", "armv8.6_2"),  # Neoverse N2: SVE2 and int8 matmul, no SME
        ("intel-i5-8250u", "haswell"),  # AVX2, FMA, F16C, BMI2; no AVX-512
        ("epyc-zen5-2core", "zen4"),  # AVX-512 with VBMI, VNNI and BF16
        ("xeon-amx-2core", "sapphirerapids"),  # what the flags claim; see test_backend.py
    ],
)
def test_expected_cpu_variant(name: str, variant: str) -> None:
    assert hardware.expected_variant(board(name)) == variant


@pytest.mark.parametrize(
    ("name", "context"),
    [
        ("raspberry-pi-4", 32768),  # 1.8 GiB memory.high: the whole trained context fits
        ("raspberry-pi-4-2gb", 32768),  # 1590 MiB: physical memory less the system's share
        ("rk3588-orange-pi-5", 32768),
        ("intel-i5-8250u", 32768),
    ],
)
def test_memory_plan_for_the_default_model(name: str, context: int) -> None:
    from test_memory import QWEN

    from edge_llm import memory

    b = board(name)
    limit = memory.budget(b.mem_limit, b.mem_total, b.mem_available)
    plan = memory.plan(QWEN, 32768, 256, limit.bytes)
    assert plan.context_length == context
    assert plan.total <= limit.bytes


def test_a_1gb_pi_plans_within_its_physical_memory() -> None:
    """MemoryMax=2G on a 1 GB board: planning to the cgroup limit meant an OOM kill, and with
    MemorySwapMax=0 a restart loop. The default model is refused with the numbers; the tiny
    one fits."""
    from test_memory import QWEN, SMOL

    from edge_llm import memory

    b = board("raspberry-pi-4-1gb")
    assert b.mem_limit is not None and b.mem_limit > 1 * memory.GIB  # the unit's cap is 2G
    limit = memory.budget(b.mem_limit, b.mem_total, b.mem_available)
    assert (limit.bytes, limit.why) == (
        925804 * 1024 - memory.OS_HEADROOM,
        "physical memory 904 MiB less 256 MiB for the system",
    )
    with pytest.raises(memory.MemoryPlanError, match=r"does not fit in 648 MiB \(physical memory"):
        memory.plan(QWEN, 8192, 256, limit.bytes, budget_why=limit.why)
    plan = memory.plan(SMOL, memory.AUTO_CONTEXT, 256, limit.bytes, budget_why=limit.why)
    assert plan.context_length == 8192 and plan.total <= limit.bytes
