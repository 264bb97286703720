"""Bad input gets INVALID_ARGUMENT naming the field, and the server goes on serving."""

from __future__ import annotations

import grpc
import pytest

from edge_llm.v1 import edge_llm_pb2 as pb

USER = [pb.Message(role="user", content="hi")]
NAN = float("nan")

BAD_REQUESTS = [
    (pb.GenerateRequest(), "set prompt"),
    (pb.GenerateRequest(prompt="x", messages=USER), "not both"),
    (pb.GenerateRequest(messages=[pb.Message(role="bot", content="hi")]), "messages[0].role"),
    (pb.GenerateRequest(prompt="x", max_tokens=0), "max_tokens"),
    (pb.GenerateRequest(prompt="x", max_tokens=-3), "max_tokens"),
    (pb.GenerateRequest(prompt="x", max_tokens=100_000), "max_tokens must be in [1, 1024]"),
    (pb.GenerateRequest(prompt="x", temperature=NAN), "temperature"),
    (pb.GenerateRequest(prompt="x", temperature=-0.1), "temperature"),
    (pb.GenerateRequest(prompt="x", temperature=float("inf")), "temperature"),
    (pb.GenerateRequest(prompt="x", top_p=0.0), "top_p"),
    (pb.GenerateRequest(prompt="x", top_p=1.5), "top_p"),
    (pb.GenerateRequest(prompt="x", top_p=NAN), "top_p"),
    (pb.GenerateRequest(prompt="x", min_p=-1), "min_p"),
    (pb.GenerateRequest(prompt="x", min_p=NAN), "min_p"),
    (pb.GenerateRequest(prompt="x", top_k=-1), "top_k"),
    (pb.GenerateRequest(prompt="x", repeat_penalty=0), "repeat_penalty"),
    (pb.GenerateRequest(prompt="x", seed=0xFFFFFFFF), "seed must be below"),
    (pb.GenerateRequest(prompt="x", stop=["s"] * 17), "stop has 17 strings"),
    (pb.GenerateRequest(prompt="x", stop=["y" * 300]), "stop[0] is 300 bytes"),
    (pb.GenerateRequest(prompt="x", stop=["ok", ""]), "stop[1] is empty"),
    (
        pb.GenerateRequest(messages=[pb.Message(role="user", content="z" * 70_000)]),
        "messages[0].content is 70000 bytes",
    ),
    (pb.GenerateRequest(prompt="z" * 70_000), "prompt is 70000 bytes"),
    (pb.GenerateRequest(messages=USER * 300), "messages has 300 entries"),
    (pb.GenerateRequest(prompt="hello " * 1500), "the context window holds 1024 tokens"),
]


@pytest.mark.parametrize(("request_", "needle"), BAD_REQUESTS, ids=lambda v: str(v)[:40])
def test_bad_generate_request(stub, request_: pb.GenerateRequest, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    # ... and the next good request is served normally.
    last = list(stub.Generate(pb.GenerateRequest(prompt="Hi", max_tokens=2), timeout=30))[-1]
    assert last.usage.completion_tokens > 0


def test_prompt_too_long_says_both_counts(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="hello " * 1500), timeout=30))
    tokens = stub.Tokenize(pb.TokenizeRequest(text="hello " * 1500)).count
    assert f"prompt is {tokens} tokens" in err.value.details()
    assert "1024" in err.value.details()


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (pb.TokenizeRequest(), "set text"),
        (pb.TokenizeRequest(text="a", messages=USER), "not both"),
        (pb.TokenizeRequest(messages=[pb.Message(role="", content="a")]), "messages[0].role"),
    ],
)
def test_bad_tokenize_request(stub, request_: pb.TokenizeRequest, needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(request_, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_oversized_request_is_refused_by_grpc(stub) -> None:
    huge = [pb.Message(role="user", content="x" * 60_000)] * 20  # 1.2 MB > 1 MiB
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(messages=huge), timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
