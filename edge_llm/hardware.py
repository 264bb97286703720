"""What the board gives this process: the CPUs it may use (affinity and cgroup v2 quota)."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """CPUs allowed by the cgroup v2 quota (`cpu.max`: "quota period"), or None if unlimited."""
    try:
        rel = _own_cgroup(root)
        text = (root / "sys/fs/cgroup" / rel.lstrip("/") / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if len(text) != 2 or text[0] == "max":
        return None
    return int(text[0]) / int(text[1])


def _own_cgroup(root: Path) -> str:
    for line in (root / "proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise ValueError("no cgroup v2 entry")


def usable_cpus(root: Path = Path("/")) -> int:
    """CPUs this process can really keep busy: its affinity, capped by the cgroup quota."""
    cpus = len(os.sched_getaffinity(0)) if root == Path("/") else os.cpu_count() or 1
    quota = cgroup_cpu_limit(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)
