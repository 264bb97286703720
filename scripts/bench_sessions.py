"""Time to first token over the turns of a conversation: a session (KV cache reused) against
the same conversation sent whole each turn with nothing reusable in the cache (reuse off),
and three sessions taking turns. All in one process, one run, the default model.

    .venv/bin/python scripts/bench_sessions.py [--turns 10] [--model default]

Reuse off is what a stateless client pays when other requests use the board between its
turns: before each of its turns an unrelated request takes the engine, so the whole history
is processed again. Its conversation replays the session's answers, so both see the same
prompts. Every conversation starts with its own terminal number, so none finds another's
first turn in the cache; one throwaway conversation first warms the engine up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import grpc

from edge_llm import models
from edge_llm.config import Config
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

SYSTEM = (
    "Terminal {n}. You are the help desk of a bicycle shop's self-service terminal. "
    "Answer in two or three plain sentences."
)
QUESTIONS = [
    "My chain jumps between gears when I pedal hard uphill. Why?",
    "How do I check whether the chain is worn?",
    "What does a new chain cost here, roughly?",
    "Do I need to change the cassette too?",
    "How long does the shop take for that?",
    "Can I ride the bike until then?",
    "What about the clicking sound from the back wheel?",
    "Could the derailleur hanger be bent?",
    "How do I know if it is bent?",
    "Thanks. What should I bring when I come in?",
    "Do you also check the brakes?",
    "And how often should a chain be oiled?",
]
MAX_TOKENS = 48


def first_token_ms(stub: pb_grpc.EdgeLLMStub, request: pb.GenerateRequest) -> tuple[float, str]:
    start = time.perf_counter()
    first, parts = 0.0, []
    for msg in stub.Generate(request):
        if msg.text and not first:
            first = time.perf_counter()
        parts.append(msg.text)
    return (first - start) * 1e3, "".join(parts)


def turn(stub: pb_grpc.EdgeLLMStub, session_id: str, text: str) -> tuple[float, str]:
    request = pb.GenerateRequest(session_id=session_id, max_tokens=MAX_TOKENS, temperature=0)
    request.messages.add(role="user", content=text)
    return first_token_ms(stub, request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    turns = QUESTIONS[: args.turns]

    config = Config(
        model=str(models.resolve(args.model)),
        port=0,
        context_length=4096,
        state_dir=tempfile.mkdtemp(prefix="bench-sessions-"),
    )
    server = Server(config)
    server.start()
    server.load()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)

            def create(n: int) -> str:
                request = pb.CreateSessionRequest(system_prompt=SYSTEM.format(n=n))
                return stub.CreateSession(request).session.id

            warm = create(0)
            for question in turns[:2]:
                turn(stub, warm, question)

            session = create(1)
            reuse, answers = [], []
            for question in turns:
                ms, answer = turn(stub, session, question)
                reuse.append(ms)
                answers.append(answer)

            off = []
            history = [pb.Message(role="system", content=SYSTEM.format(n=1))]
            for i, question in enumerate(turns):
                flush = pb.GenerateRequest(prompt=f"{i} unrelated", max_tokens=1)
                list(stub.Generate(flush))  # takes the cache: nothing of the history is left
                history.append(pb.Message(role="user", content=question))
                request = pb.GenerateRequest(messages=history, max_tokens=MAX_TOKENS, temperature=0)
                off.append(first_token_ms(stub, request)[0])
                history.append(pb.Message(role="assistant", content=answers[i]))

            three = [create(n) for n in (2, 3, 4)]
            alternating: list[list[float]] = []
            for question in turns:
                alternating.append([turn(stub, s, question)[0] for s in three])
            prompt_tokens = [
                j.stats.prompt_tokens for j in list(server.core.loaded.scheduler.recent)[-3:]
            ]
    finally:
        server.stop(drain=0)

    name = models.resolve(args.model).name
    print(
        f"model {name}, context 4096, answers of up to {MAX_TOKENS} tokens, greedy; "
        "time to first token (ms) as the client sees it"
    )
    print(f"{'turn':>4} {'session':>9} {'reuse off':>10} {'3 alternating (mean)':>22}")
    for i in range(len(turns)):
        print(
            f"{i + 1:>4} {reuse[i]:>9.0f} {off[i]:>10.0f} {statistics.mean(alternating[i]):>22.0f}"
        )
    last = len(turns) - 1
    print(
        f"turn {last + 1} / turn 1: session {reuse[last] / reuse[0]:.2f}x, reuse off "
        f"{off[last] / off[0]:.2f}x, 3 alternating "
        f"{statistics.mean(alternating[last]) / statistics.mean(alternating[0]):.2f}x; "
        f"prompt at turn {last + 1}: {prompt_tokens[-1]} tokens"
    )


if __name__ == "__main__":
    main()
