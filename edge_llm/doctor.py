"""`edge-llm doctor`: what the service would decide on this board, and why."""

from __future__ import annotations

import json
from typing import Any

from edge_llm import hardware, memory, models
from edge_llm.config import Config
from edge_llm.engine import ModelLoadError, cpu_features_used, read_shape, system_info

MIB = memory.MIB


def report(config: Config) -> dict[str, Any]:
    board = hardware.detect()
    threads = hardware.plan_threads(board)
    budget = config.memory_budget_mb * MIB or memory.budget(board.mem_limit)
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
            "generation": config.threads or threads.generation,
            "prompt": config.threads_batch or threads.prompt,
            "why": threads.why if not (config.threads or config.threads_batch) else "configured",
        },
        # One build, compiled for this CPU (GGML_NATIVE): there is no variant to choose yet.
        "cpu_backend": {"build": "native", "uses": list(cpu_features_used(system_info()))},
        "warnings": list(board.warnings),
    }
    path = models.resolve(config.model)
    out["model"] = {"path": str(path)}
    try:
        models.check_gguf(path, config.model)
        shape = read_shape(path)
        plan = memory.plan(shape, config.context_length, config.batch_size, budget)
        out["memory"] = {
            "budget_bytes": plan.budget,
            "total_bytes": plan.total,
            "weights_bytes": plan.weights,
            "kv_cache_bytes": plan.kv,
            "compute_bytes": plan.compute,
            "runtime_bytes": plan.runtime,
            "context_length": plan.context_length,
            "requested_context_length": plan.requested_context,
            "summary": plan.describe(),
        }
        if plan.shrunk:
            out["warnings"].append(
                f"context {plan.requested_context} does not fit: the service will use "
                f"{plan.context_length}"
            )
    except (models.ModelError, ModelLoadError, memory.MemoryPlanError) as e:
        out["warnings"].append(str(e))
    if warning := hardware.storage_warning(path):
        out["warnings"].append(warning)
    return out


def main(config: Config, as_json: bool) -> int:
    r = report(config)
    if as_json:
        print(json.dumps(r, indent=2))
        return 0
    b, t = r["board"], r["threads"]
    limit = f"{b['mem_limit_bytes'] / MIB:.0f} MiB" if b["mem_limit_bytes"] else "none"
    quota = f"{b['cpu_quota']:g} CPUs" if b["cpu_quota"] else "none"
    print(f"board     {b['model']} ({b['arch']})")
    print(f"cpus      usable {b['cpus']}, fast cluster {b['fast_cluster']}, quota {quota}")
    print(f"memory    available {(b['mem_available_bytes'] or 0) / MIB:.0f} MiB, "
          f"cgroup limit {limit}")  # fmt: skip
    print(f"threads   {t['generation']} generation, {t['prompt']} prompt ({t['why']})")
    print(f"backend   {r['cpu_backend']['build']} build using {' '.join(r['cpu_backend']['uses'])}")
    print(f"model     {r['model']['path']}")
    if "memory" in r:
        print(f"plan      {r['memory']['summary']}")
    for w in r["warnings"]:
        print(f"warning   {w}")
    if not r["warnings"]:
        print("warnings  none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Config(), as_json=False))
