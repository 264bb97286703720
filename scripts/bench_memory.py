"""Peak RSS of a serving process against the memory plan's estimate, at 2k and 8k context,
with 1, 4 and 8 requests decoding at once.

Usage: .venv/bin/python scripts/bench_memory.py [--model NAME|PATH]
Starts `edge-llm serve` for each context size and number of streams (`--parallel` that many),
fills most of the KV pool with that many requests at once (so the KV cache and compute buffer
are touched; they stream over the OpenAI-style HTTP API, so both the gRPC and the HTTP stack
are resident), and reads VmHWM from /proc.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx

from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

MIB = 1024**2


def measure(model: str, context: int, streams: int, port: int) -> str:
    cmd = [
        sys.executable,
        "-m",
        "edge_llm",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--context-length",
        str(context),
        "--log-level",
        "info",
        "--http-listen",
        "127.0.0.1:0",
        "--parallel",
        str(streams),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        http = ""
        while "ready" not in (line := proc.stderr.readline()):
            if not line:
                raise SystemExit("the server died; run the command by hand to see why")
            if "HTTP on " in line:
                http = line.split("HTTP on ")[1].split()[0].rstrip(":")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            plan = stub.GetInfo(pb.GetInfoRequest()).memory
            texts = [
                f"{n}: " + " ".join(f"w{i}" for i in range(context // 5 // streams))
                for n in range(streams)
            ]
            prompt = sum(stub.Tokenize(pb.TokenizeRequest(text=t)).count for t in texts)

        def fill(text: str) -> None:
            body = {"prompt": text, "max_tokens": 32, "ignore_eos": True, "stream": True}
            url = f"http://{http}/v1/completions"
            with httpx.stream("POST", url, json=body, timeout=600) as r:
                for _ in r.iter_lines():
                    pass

        threads = [threading.Thread(target=fill, args=(t,)) for t in texts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = Path(f"/proc/{proc.pid}/status").read_text()
    finally:
        proc.terminate()
        proc.wait()
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
    return (
        f"| {context} | {streams} | {prompt} | {peak / MIB:.0f} MiB | "
        f"{plan.total_bytes / MIB:.0f} MiB "
        f"(weights {plan.weights_bytes / MIB:.0f} + KV {plan.kv_cache_bytes / MIB:.0f} + "
        f"compute {plan.compute_bytes / MIB:.0f} + runtime {plan.runtime_bytes / MIB:.0f}) | "
        f"{100 * peak / plan.total_bytes:.0f} % |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--port", type=int, default=50077)
    args = parser.parse_args()
    print(
        "| context | streams | prompt tokens | peak RSS | plan | peak / plan |\n"
        "|---|---|---|---|---|---|"
    )
    for context in (2048, 8192):
        for streams in (1, 4, 8):
            print(measure(args.model, context, streams, args.port), flush=True)


if __name__ == "__main__":
    main()
