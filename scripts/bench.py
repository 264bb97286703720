"""Time to first token and decode rate as a gRPC client sees them, against llama-cpp-python direct.

Both sides load the same model with the same settings in this one process and run the same
greedy generations, taking turns, so a different CPU or a busy machine moves both alike. The
direct baseline is llama-cpp-python's own token loop (Llama.generate + detokenize per token),
the fastest path that library offers. The gRPC client runs in a process of its own, as a
terminal's UI would; it is also measured inside the server's process (the worst case: it then
competes with the server for the GIL). Run through scripts/bench.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import llama_cpp

from edge_llm import hardware, models
from edge_llm.config import Config
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

# About 100 tokens: a kiosk's system prompt and question, not a one-liner.
TASK = (
    "You are the help desk of a bicycle shop's self-service terminal. Answer in plain words, "
    "without lists or headings, and keep a warm, patient tone: the customer may be a child or "
    "someone who has never repaired anything. If a repair needs special tools, say so and "
    "suggest asking the staff at the counter. Question: my chain keeps jumping between gears "
    "when I pedal hard uphill, and there is a clicking sound from the back wheel. What is "
    "going on, and what can I do about it myself?"
)


@dataclass
class Run:
    ttft_ms: float
    decode_tps: float
    tokens: int


def prompt_for(i: int) -> str:
    # A different first token every run: neither side may reuse the previous run's KV cache.
    return f"{i}. {TASK}\n\n"


def direct_run(llm: llama_cpp.Llama, prompt: str, max_tokens: int) -> Run:
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    for token in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
        llm.detokenize([token])
        last = time.perf_counter()
        first = first or last
        n += 1
        if n >= max_tokens:
            break
    return Run((first - start) * 1e3, (n - 1) / (last - first), n)


def grpc_run(stub: pb_grpc.EdgeLLMStub, prompt: str, max_tokens: int) -> Run:
    req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    for msg in stub.Generate(req):
        if msg.text:
            last = time.perf_counter()
            first = first or last
        if msg.HasField("usage"):
            n = msg.usage.completion_tokens
    return Run((first - start) * 1e3, (n - 1) / (last - first), n)


def client_process(port: int, prompt: str, max_tokens: int) -> Run:
    """One gRPC run from a fresh process; its start-up is outside the timed part."""
    out = subprocess.run(
        [sys.executable, __file__, "--client", str(port), prompt, str(max_tokens)],
        capture_output=True,
        text=True,
        check=True,
    )
    return Run(**json.loads(out.stdout))


def client_main(port: str, prompt: str, max_tokens: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EdgeLLMStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)
        print(json.dumps(grpc_run(stub, prompt, int(max_tokens)).__dict__))


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        return client_main(*sys.argv[2:5])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default", help="GGUF path or known model name")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    threads = args.threads or hardware.usable_cpus()
    config = Config(
        model=args.model,
        port=0,
        context_length=2048,
        threads=threads,
        threads_batch=threads,
        log_level="warning",
    )
    path = models.resolve(args.model)
    server = Server(config)
    server.start()
    server.load()
    direct = llama_cpp.Llama(
        str(path),
        n_ctx=config.context_length,
        n_batch=config.batch_size,
        n_ubatch=config.batch_size,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    runs: dict[str, list[Run]] = {"direct": [], "process": [], "inprocess": []}
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.EdgeLLMStub(channel)
        sides = {
            "direct": lambda p: direct_run(direct, p, args.max_tokens),
            "process": lambda p: client_process(server.port, p, args.max_tokens),
            "inprocess": lambda p: grpc_run(stub, p, args.max_tokens),
        }
        direct_run(direct, prompt_for(1000), 8)  # warm both
        grpc_run(stub, prompt_for(1001), 8)
        for r in range(args.rounds):
            # Rotate which side goes first, so none always runs on a warmer cache.
            names = list(sides)[r % 3 :] + list(sides)[: r % 3]
            for k, name in enumerate(names):
                runs[name].append(sides[name](prompt_for(3 * r + k)))
    server.stop(drain=0)

    def med(runs: list[Run], field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs)

    prompt_tokens = len(direct.tokenize(prompt_for(0).encode(), add_bos=True, special=True))
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
        "unknown CPU",
    )
    print(f"model {path.name}, {threads} threads, {cpu}")
    print(
        f"{args.rounds} rounds, {prompt_tokens} prompt tokens, {args.max_tokens} tokens each "
        "(greedy); medians"
    )
    print()
    d_ttft, d_tps = med(runs["direct"], "ttft_ms"), med(runs["direct"], "decode_tps")
    print("| | time to first token | decode | vs direct |")
    print("|---|---|---|---|")
    print(f"| llama-cpp-python direct | {d_ttft:.1f} ms | {d_tps:.1f} tokens/s | |")
    labels = {
        "process": "edge-llm, gRPC client in its own process",
        "inprocess": "edge-llm, gRPC client in the server's process",
    }
    for name, label in labels.items():
        ttft, tps = med(runs[name], "ttft_ms"), med(runs[name], "decode_tps")
        print(
            f"| {label} | {ttft:.1f} ms | {tps:.1f} tokens/s | "
            f"{ttft - d_ttft:+.1f} ms, {100 * tps / d_tps:.1f} % |"
        )
    ttft, tps = med(runs["process"], "ttft_ms"), med(runs["process"], "decode_tps")
    ok = tps >= 0.95 * d_tps and ttft - d_ttft <= 50
    print()
    print(
        f"targets for the own-process client (>= 95 % of the direct decode rate, first token "
        f"within 50 ms of direct): {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
