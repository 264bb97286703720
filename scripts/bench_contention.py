"""Generation speed when other processes want the CPU too, under llama.cpp's OpenMP wait
policies: libgomp's default (threads spin 300k rounds between graph runs), the short spin that
engine.py sets unless the environment chooses, and passive waiting.

    .venv/bin/python scripts/bench_contention.py [--model default] [--rounds 5] [--only idle]

Each measurement is a new process (libgomp reads its settings when it loads): the model is
loaded with 2 threads, a 400-token prompt is processed, then 100 tokens are generated greedily.
Rounds take turns between the policies, first on an idle machine, then with one busy loop per
CPU running beside it. Medians, and each policy against libgomp's default in the same condition.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from edge_llm import models

POLICIES = {
    "libgomp default": {},
    "GOMP_SPINCOUNT=2000 (edge-llm)": {"GOMP_SPINCOUNT": "2000"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
}

MEASURE = """
import sys, time
from edge_llm import backend
backend.load()
import llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_ctx=1024, n_batch=256, n_ubatch=256, n_threads=2,
                    n_threads_batch=2, verbose=False)
prompt = m.tokenize(("Here is a note about harbours, ships and tides. " * 40).encode())[:400]
m.eval(prompt[:8]); m.reset()
t = time.monotonic(); m.eval(prompt); pp = len(prompt) / (time.monotonic() - t)
t, n = time.monotonic(), 0
for _ in m.generate(prompt, temp=0):
    n += 1
    if n >= 100:
        break
print(pp, n / (time.monotonic() - t))
"""


def measure(model: str, env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, model],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    ).stdout
    prompt, decode = map(float, out.split())
    return prompt, decode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=("idle", "busy"), help="measure one condition only")
    args = p.parse_args()
    model = str(models.resolve(args.model))
    cpus = len(os.sched_getaffinity(0))
    conditions = {"idle": "idle", "busy": f"{cpus} busy loops beside it"}
    for key, condition in conditions.items():
        if args.only not in (None, key):
            continue
        busy = []
        if key == "busy":
            loop = [sys.executable, "-c", "while True: pass"]
            busy = [subprocess.Popen(loop) for _ in range(cpus)]
        try:
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in POLICIES}
            for _ in range(args.rounds):
                for name, env in POLICIES.items():
                    results[name].append(measure(model, env))
        finally:
            for proc in busy:
                proc.kill()
        base = [statistics.median(x[i] for x in results["libgomp default"]) for i in (0, 1)]
        print(f"{condition}: median of {args.rounds}, tokens/s (prompt, decode)")
        for name, values in results.items():
            pp, dec = (statistics.median(x[i] for x in values) for i in (0, 1))
            print(
                f"  {name:24} prompt {pp:6.1f} ({pp / base[0]:.2f}x)  decode {dec:5.1f} "
                f"({dec / base[1]:.2f}x)"
            )


if __name__ == "__main__":
    main()
