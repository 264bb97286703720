"""What idle caches in the KV pool cost the requests that run: the engine alone, two contexts
of the same model side by side, one with a clean pool and one holding `--idle` more caches of
`--idle-tokens` each (as a pool that kept finished requests' caches would), timed in turns.

Each turn, three sequences answer and a fourth brings a ~100-token prompt in the same step
(a new request's first step beside three streams), then the three answer alone (a plain
decoding step). Why kvstates.py saves idle caches out of the pool once anything runs.

    .venv/bin/python scripts/bench_idle_cells.py [--idle 8] [--turns 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench import TASK

from edge_llm import models
from edge_llm.engine import Engine, EngineSettings
from edge_llm.types import Part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--idle", type=int, default=8)
    ap.add_argument("--idle-tokens", type=int, default=235)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    settings = EngineSettings(8192, 256, args.threads, args.threads, sequences=4 + args.idle)
    path = models.resolve(args.model)
    engines = {"clean pool": Engine(path, settings), "idle caches": Engine(path, settings)}
    text = engines["clean pool"].tokenize(" ".join([TASK] * 20), ())
    prompt, running = text[:107], 150

    def fill(engine: Engine, seq: int, n: int) -> None:
        tokens = [seq, *text[: n - 1]]
        for at in range(0, n, settings.batch_size):
            engine.decode([Part(seq, at, tokens[at : at + settings.batch_size], False)])

    for name, engine in engines.items():
        for seq in range(3):
            fill(engine, seq, running)
        for seq in range(4, 4 + args.idle if name == "idle caches" else 4):
            fill(engine, seq, args.idle_tokens)
    first: dict[str, list[float]] = {name: [] for name in engines}
    step: dict[str, list[float]] = {name: [] for name in engines}
    for turn in range(args.turns):
        pos = running + 2 * turn
        for name, engine in engines.items():
            answering = [Part(seq, pos, [100 + turn], True) for seq in range(3)]
            start = time.perf_counter()
            engine.decode([*answering, Part(3, 0, [turn, *prompt[1:]], True)])
            middle = time.perf_counter()
            engine.decode([Part(seq, pos + 1, [101 + turn], True) for seq in range(3)])
            end = time.perf_counter()
            engine.seq_drop(3)
            first[name].append((middle - start) * 1e3)
            step[name].append((end - middle) * 1e3)
    base = "clean pool"
    print("| pool | 3 answering + a 107-token prompt, ms | 3 answering, ms |\n|---|---|---|")
    for name in engines:
        f, s = statistics.median(first[name]), statistics.median(step[name])
        fb, sb = statistics.median(first[base]), statistics.median(step[base])
        print(f"| {name} | {f:.0f} ({f / fb:.2f}x) | {s:.1f} ({s / sb:.2f}x) |")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
