"""What the board gives this process: CPU features, cores and clusters, CPU and memory limits.

Every reader takes a root directory, so a board's files recorded under tests/fixtures/boards/
(scripts/record-board makes such a copy) read exactly as the live system does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

LIVE = Path("/")

# ARM "CPU part" codes (implementer 0x41, Arm Ltd.) of cores found on edge boards.
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4d": "Cortex-A715",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
}


# ggml's CPU backend variants (GGML_CPU_ALL_VARIANTS, ggml/src/CMakeLists.txt), oldest first,
# with the /proc/cpuinfo flags each needs. Kept to explain and test the choice on recorded
# boards; on the live board ggml's own ggml_backend_score() decides (backend.py).
_AVX2 = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_AVX512 = (*_AVX2, "avx512f")
X86_VARIANTS = {
    "x64": (),
    "sse42": ("sse4_2",),
    "sandybridge": ("sse4_2", "avx"),
    "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"),
    "haswell": _AVX2,
    "skylakex": _AVX512,
    "cannonlake": (*_AVX512, "avx512vbmi"),
    "cascadelake": (*_AVX512, "avx512_vnni"),
    "icelake": (*_AVX512, "avx512vbmi", "avx512_vnni"),
    "cooperlake": (*_AVX512, "avx512_vnni", "avx512_bf16"),
    "zen4": (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "alderlake": (*_AVX2, "avx_vnni"),
    "sapphirerapids": (
        *_AVX512,
        "avx512vbmi",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
    ),
}
ARM_VARIANTS = {
    "armv8.0_1": (),
    "armv8.2_1": ("asimddp",),
    "armv8.2_2": ("asimddp", "asimdhp"),
    "armv8.2_3": ("asimddp", "asimdhp", "sve"),
    "armv8.6_1": ("asimddp", "asimdhp", "sve", "i8mm"),
    "armv8.6_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2"),
    "armv9.2_1": ("asimddp", "asimdhp", "sve", "i8mm", "sme"),
    "armv9.2_2": ("asimddp", "asimdhp", "sve", "i8mm", "sve2", "sme"),
}


@dataclass(frozen=True)
class Cpu:
    id: int
    core: int  # the lowest CPU id among its SMT siblings: one value per physical core
    capacity: int  # relative performance: cpu_capacity, else max frequency, else 0
    name: str = ""  # the core's model where the board says (ARM "CPU part")


@dataclass(frozen=True)
class Board:
    arch: str  # "x86_64", "aarch64", ...
    model: str  # the CPU's or the board's name
    features: frozenset[str]
    cpus: tuple[Cpu, ...]  # online CPUs this process may run on (affinity)
    cpu_quota: float | None  # CPUs allowed by the cgroup CPU quota; None when unlimited
    mem_available: int | None  # bytes, /proc/meminfo MemAvailable
    mem_total: int | None  # bytes, /proc/meminfo MemTotal: physical memory
    mem_limit: int | None  # bytes, the tightest cgroup memory limit (v2 max/high, v1 limit)
    warnings: tuple[str, ...] = field(default=())

    @property
    def big_cpus(self) -> tuple[Cpu, ...]:
        """The fastest cluster; all CPUs when they are alike."""
        top = max((c.capacity for c in self.cpus), default=0)
        return tuple(c for c in self.cpus if c.capacity == top) if top else self.cpus


@dataclass(frozen=True)
class Threads:
    generation: int
    prompt: int
    why: str


def expected_variant(board: Board) -> str | None:
    """The ggml CPU variant this board's flags call for: the one needing the most of them."""
    table = X86_VARIANTS if board.arch == "x86_64" else ARM_VARIANTS
    if board.arch not in ("x86_64", "aarch64"):
        return None
    runnable = [name for name, needs in table.items() if set(needs) <= board.features]
    return max(runnable, key=lambda name: len(table[name]))


def plan_threads(board: Board) -> Threads:
    """Generation: one thread per big physical core we may use; prompt: every physical core.

    Token generation waits on memory and on its slowest thread, so LITTLE cores and SMT
    siblings slow it down; prompt processing is compute bound and gains from every core. Both
    are capped by the cgroup CPU quota: threads beyond it are descheduled mid-step.
    """
    big_cores = {c.core for c in board.big_cpus}
    all_cores = {c.core for c in board.cpus}
    generation, prompt = max(1, len(big_cores)), max(1, len(all_cores))
    why = [f"{len(board.cpus)} usable CPUs, {len(all_cores)} physical cores"]
    if len(big_cores) < len(all_cores) and len(board.big_cpus) < len(board.cpus):
        why.append(f"{len(big_cores)} in the fast cluster")
    if board.cpu_quota is not None:
        cap = max(1, math.floor(board.cpu_quota))
        if cap < prompt:
            why.append(f"cgroup quota {board.cpu_quota:g} CPUs")
        generation, prompt = min(generation, cap), min(prompt, cap)
    return Threads(generation, prompt, ", ".join(why))


def detect(root: Path = LIVE) -> Board:
    cpuinfo = _read(root / "proc/cpuinfo") or ""
    first = _first_block(cpuinfo)
    arch = _arch(root, first)
    features = frozenset((first.get("flags") or first.get("Features") or "").split())
    ids = _parse_list(_read(root / "sys/devices/system/cpu/online") or "") or sorted(
        _cpuinfo_parts(cpuinfo)
    )
    allowed = _allowed_cpus(root)
    parts = _cpuinfo_parts(cpuinfo)
    cpus = tuple(
        _cpu(root, i, parts.get(i, "")) for i in ids if allowed is None or i in allowed
    ) or (Cpu(0, 0, 0),)
    return Board(
        arch=arch,
        model=_model(root, first, cpus),
        features=features,
        cpus=cpus,
        cpu_quota=_cpu_quota(root),
        mem_available=_meminfo(root, "MemAvailable"),
        mem_total=_meminfo(root, "MemTotal"),
        mem_limit=_memory_limit(root),
        warnings=_warnings(root),
    )


def storage_warning(path: Path, root: Path = LIVE) -> str | None:
    """A model on an SD card loads slowly, and every cold page fault waits on the card."""
    try:
        dev = path.stat().st_dev
    except OSError:
        return None
    block = (root / f"sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    if "mmcblk" in str(block):
        return (
            f"{path} is on an SD card ({block.name}): loading is slow and cold pages stall "
            "generation; keep models on an SSD or eMMC if the board has one"
        )
    return None


def _warnings(root: Path) -> tuple[str, ...]:
    found = []
    swaps = (_read(root / "proc/swaps") or "").splitlines()[1:]
    if swaps:
        found.append(
            "swap is on: under memory pressure model pages are swapped out and every token "
            "waits on the disk; turn swap off, or set MemorySwapMax=0 for the service"
        )
    governor = (_read(root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "").strip()
    if governor in ("powersave", "conservative"):
        found.append(
            f"CPU frequency governor is {governor!r}: generation runs slower than the board "
            "can; 'performance' or 'schedutil' serve an appliance better"
        )
    return tuple(found)


def usable_cpus(root: Path = LIVE) -> int:
    """Physical cores this process can keep busy (affinity, capped by the cgroup quota)."""
    return plan_threads(detect(root)).prompt


# -- readers --------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def _parse_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the kernel's CPU list format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _first_block(cpuinfo: str) -> dict[str, str]:
    """The first processor's fields, plus the file's trailing board-wide fields (ARM)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _cpuinfo_parts(cpuinfo: str) -> dict[int, str]:
    """Processor number -> the ARM core name from its "CPU part" (empty on x86)."""
    parts: dict[int, str] = {}
    current = None
    for line in cpuinfo.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "processor" and value.isdigit():
            current = int(value)
            parts[current] = ""
        elif key == "CPU part" and current is not None:
            parts[current] = ARM_PARTS.get(value.lower(), value)
    return parts


def _arch(root: Path, first: dict[str, str]) -> str:
    if root == LIVE:
        import platform

        return platform.machine()
    if "flags" in first:
        return "x86_64"
    return "aarch64" if "Features" in first else "unknown"


def _model(root: Path, first: dict[str, str], cpus: tuple[Cpu, ...]) -> str:
    board = (_read(root / "proc/device-tree/model") or "").strip("\0\n ")
    cpu = first.get("model name", "")
    if not cpu and any(c.name for c in cpus):
        names: dict[str, int] = {}
        for c in cpus:
            names[c.name] = names.get(c.name, 0) + 1
        cpu = " + ".join(f"{n}x {name}" for name, n in names.items())
    return f"{board} ({cpu})" if board and cpu else board or cpu or "unknown CPU"


def _allowed_cpus(root: Path) -> set[int] | None:
    for line in (_read(root / "proc/self/status") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return set(_parse_list(line.split(":", 1)[1]))
    return None


def _cpu(root: Path, i: int, name: str) -> Cpu:
    base = root / f"sys/devices/system/cpu/cpu{i}"
    capacity = _int(base / "cpu_capacity") or _int(base / "cpufreq/cpuinfo_max_freq") or 0
    # core_id alone is not unique (ARM numbers cores per cluster); the sibling list is.
    siblings = _parse_list(_read(base / "topology/thread_siblings_list") or "")
    return Cpu(i, min(siblings, default=i), capacity, name)


def _cgroup_dirs(root: Path, controller: str) -> list[Path]:
    """This process's cgroup directory and its parents, where a limit on `controller` may be
    set: cgroup v2 (the unified hierarchy), or v1 (a hierarchy per controller, as on hybrid
    systems and older boards). A limit on any of them applies."""
    dirs = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",")
        if controllers == "":  # v2
            candidates = [root / "sys/fs/cgroup"]
        elif controller in names:  # v1, mounted under its own name or the joined list
            candidates = [root / "sys/fs/cgroup" / controllers, root / "sys/fs/cgroup" / controller]
        else:
            continue
        for top in candidates:
            d = top / path.strip().lstrip("/")
            if d.is_dir():
                dirs.append(d)
                while d != top and top in d.parents:
                    d = d.parent
                    dirs.append(d)
                break
    return dirs


def _cpu_quota(root: Path) -> float | None:
    limits = []
    for d in _cgroup_dirs(root, "cpu"):
        fields = (_read(d / "cpu.max") or "").split()  # v2: "quota period" or "max period"
        if len(fields) == 2 and fields[0] != "max":
            limits.append(int(fields[0]) / int(fields[1]))
        quota = (_read(d / "cpu.cfs_quota_us") or "").strip()  # v1: -1 without a limit
        period = (_read(d / "cpu.cfs_period_us") or "").strip()
        if quota.isdigit() and period.isdigit() and int(period):
            limits.append(int(quota) / int(period))
    return min(limits, default=None)


_V1_NO_LIMIT = 1 << 62  # v1 says "no limit" with the largest page-aligned count


def _memory_limit(root: Path) -> int | None:
    limits = []
    for d in _cgroup_dirs(root, "memory"):
        for name in ("memory.max", "memory.high", "memory.limit_in_bytes"):
            text = (_read(d / name) or "").strip()
            if text.isdigit() and int(text) < _V1_NO_LIMIT:
                limits.append(int(text))
    return min(limits, default=None)


def _meminfo(root: Path, key: str) -> int | None:
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None
