"""`edge-llm doctor`: what the service would decide on this board, and why."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from edge_llm import backend, hardware, memory, models
from edge_llm.config import Config
from edge_llm.engine import ModelLoadError, cpu_features_used, system_info
from edge_llm.server import plan_resources

MIB = memory.MIB


class BoardError(ValueError):
    """A recorded board this machine cannot stand in for."""


def report(config: Config, board_root: Path = hardware.LIVE) -> dict[str, Any]:
    """What serve would decide on this board, or on the one recorded under `board_root`."""
    board = hardware.detect(board_root)
    here = platform.machine()
    if board.arch != here:
        raise BoardError(
            f"{board_root} is a recording of an {board.arch} board; this machine is {here}, "
            "and the CPU variant is chosen by trying it on the CPU: run this on an "
            f"{board.arch} machine (or under qemu-{board.arch})"
        )
    threads = hardware.plan_threads(board)
    path = models.resolve(config.model)
    out: dict[str, Any] = {
        "board": {
            "model": board.model,
            "arch": board.arch,
            "cpus": [c.id for c in board.cpus],
            "fast_cluster": [c.id for c in board.big_cpus],
            "cpu_quota": board.cpu_quota,
            "mem_available_bytes": board.mem_available,
            "mem_limit_bytes": board.mem_limit,
            "features": sorted(board.features),
        },
        "threads": {
            "generation": threads.generation,
            "prompt": threads.prompt,
            "why": threads.why,
        },
        "model": {"path": str(path)},
        "warnings": list(board.warnings),
    }
    try:
        cpu = backend.load(config.cpu_variant, path if path.is_file() else None)
        out["cpu_backend"] = {
            "variant": cpu.variant,
            "why": cpu.why,
            "rejected": cpu.rejected,
            "self_test": cpu.tested,
            "expected_from_cpu_flags": hardware.expected_variant(board),
            "scores": cpu.scores,
            "uses": list(cpu_features_used(system_info())),
        }
        models.check_gguf(path, config.model)
        plan = plan_resources(config, path, board)
    except (backend.BackendError, models.ModelError, ModelLoadError, memory.MemoryPlanError) as e:
        out["warnings"].append(str(e))
    else:
        m, s = plan.memory, plan.settings
        # What serve will use: configured values win over the board's.
        out["threads"] = {
            "generation": s.threads,
            "prompt": s.threads_batch,
            "why": plan.threads_why,
        }
        out["memory"] = {
            "budget_bytes": m.budget,
            "total_bytes": m.total,
            "weights_bytes": m.weights,
            "kv_cache_bytes": m.kv,
            "compute_bytes": m.compute,
            "runtime_bytes": m.runtime,
            "context_length": m.context_length,
            "requested_context_length": m.requested_context,
            "summary": m.describe(),
        }
        if m.shrunk and config.context_length:
            out["warnings"].append(
                f"context {m.requested_context} does not fit: the service will use "
                f"{m.context_length}"
            )
    if warning := hardware.storage_warning(path):
        out["warnings"].append(warning)
    return out


def main(config: Config, as_json: bool, board_root: Path | None = None) -> int:
    try:
        r = report(config, board_root or hardware.LIVE)
    except BoardError as e:
        print(f"edge-llm: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(r, indent=2))
        return 0
    b = r["board"]
    limit = f"{b['mem_limit_bytes'] / MIB:.0f} MiB" if b["mem_limit_bytes"] else "none"
    quota = f"{b['cpu_quota']:g} CPUs" if b["cpu_quota"] else "none"
    print(f"board     {b['model']} ({b['arch']})")
    print(f"cpus      usable {b['cpus']}, fast cluster {b['fast_cluster']}, quota {quota}")
    print(
        f"memory    available {(b['mem_available_bytes'] or 0) / MIB:.0f} MiB, cgroup limit {limit}"
    )
    if t := r.get("threads"):
        print(f"threads   {t['generation']} generation, {t['prompt']} prompt ({t['why']})")
    if c := r.get("cpu_backend"):
        print(f"backend   {c['variant']} ({c['why']})")
        for variant, cause in c["rejected"].items():
            print(f"rejected  {variant}: {cause}")
        print(f"          uses {' '.join(c['uses'])}")
    print(f"model     {r['model']['path']}")
    if "memory" in r:
        print(f"plan      {r['memory']['summary']}")
    for w in r["warnings"]:
        print(f"warning   {w}")
    if not r["warnings"]:
        print("warnings  none")
    return 0
