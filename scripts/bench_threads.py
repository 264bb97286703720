"""Prompt and decode tokens/s of the default model for 1..N threads, llama-cpp-python direct.

Usage: .venv/bin/python scripts/bench_threads.py [--model NAME|PATH] [--rounds 3]
       [--cpu-variant auto|haswell|...]
Each thread count runs the same 256-token prompt and 64 greedy tokens; medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import llama_cpp

from edge_llm import backend, hardware, models


def measure(llm: llama_cpp.Llama, prompt: list[int], n: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
        if i + 1 >= n:
            break
    return len(prompt) / prompt_s, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-variant", default="auto", help="ggml CPU variant to load")
    args = parser.parse_args()
    path = models.resolve(args.model)
    cpu = backend.load(args.cpu_variant)
    board = hardware.detect()
    cpus = len(os.sched_getaffinity(0))
    print(
        f"{path.name} on {board.model} ({cpu.variant} variant), {cpus} CPUs; edge-llm picks "
        f"{hardware.plan_threads(board)}"
    )
    print("| threads | prompt tokens/s | decode tokens/s |\n|---|---|---|")
    for threads in range(1, cpus + 1):
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=1024,
            n_batch=256,
            n_ubatch=256,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        prompt = llm.tokenize(b"The quick brown fox " * 64, add_bos=True)[:256]
        runs = [measure(llm, prompt, 64) for _ in range(args.rounds)]
        pp = statistics.median(r[0] for r in runs)
        tg = statistics.median(r[1] for r in runs)
        print(f"| {threads} | {pp:.1f} | {tg:.1f} |")
        llm.close()


if __name__ == "__main__":
    main()
