"""Hostile input, generated (hypothesis): every request field a client controls, as protobuf,
as raw bytes and as JSON, converts or is refused with a RequestError, never anything else; the
text stream neither loses nor invents text whatever the token bytes; and a real server, fed
random HTTP bodies and malformed WebSocket frames, answers each with a 4xx or an error frame
and goes on serving. The number of inputs tried is each test's `max_examples`."""

from __future__ import annotations

import codecs
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from helpers import start_server
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from edge_llm import convert
from edge_llm import openai_convert as oc
from edge_llm.checks import Limits
from edge_llm.server import Server
from edge_llm.textstream import TextStream
from edge_llm.types import GenerateRequest, RequestError
from edge_llm.v1 import edge_llm_pb2 as pb

LIMITS = Limits(context_length=2048, max_tokens=64, default_max_tokens=16, queue_depth=4)
# Plausible values often, any value of the type sometimes: both sides of every check.
INT32 = st.integers(-2, 80) | st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(0, 2, width=32) | st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=40)
ROLES = st.sampled_from(["system", "user", "assistant", "user", "tool", "", "USER"]) | TEXT


def well_formed(request: GenerateRequest) -> None:
    """What a converted request promises the engine."""
    assert 1 <= request.max_tokens <= LIMITS.max_tokens
    s = request.sampling
    for value in (s.temperature, s.top_p, s.min_p, s.repeat_penalty):
        assert math.isfinite(value)
    assert bool(request.prompt) != bool(request.messages)


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    msg = pb.GenerateRequest()
    if draw(st.booleans()):
        msg.prompt = draw(TEXT)
    if not msg.prompt or draw(st.integers(0, 9)) == 0:  # both: seldom
        for role, content in draw(st.lists(st.tuples(ROLES, TEXT), max_size=4)):
            msg.messages.add(role=role, content=content)
    # Every optional number the .proto has, so a field added there is fuzzed too.
    kinds = {
        FieldDescriptor.TYPE_INT32: INT32,
        FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
        FieldDescriptor.TYPE_FLOAT: FLOATS,
    }
    for field in pb.GenerateRequest.DESCRIPTOR.fields:
        if field.type in kinds and field.has_presence and draw(st.booleans()):
            setattr(msg, field.name, draw(kinds[field.type]))
    msg.stop.extend(draw(st.lists(TEXT, max_size=3)))
    msg.ignore_eos = draw(st.booleans())
    msg.session_id = draw(st.sampled_from(["", "0" * 32]) | TEXT)
    return msg


@settings(max_examples=2000, deadline=None)
@given(generate_requests())
def test_any_protobuf_request_converts_or_is_refused(msg: pb.GenerateRequest) -> None:
    try:
        request = convert.generate_request_from_pb(msg, LIMITS)
    except RequestError as e:
        assert str(e)  # a message that names what is wrong
        event("refused")
        return
    event("accepted")
    well_formed(request)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_as_a_request_convert_or_are_refused(data: bytes) -> None:
    try:
        msg = pb.GenerateRequest.FromString(data)
    except DecodeError:
        return  # grpc refuses these before our code runs
    with contextlib.suppress(RequestError):
        well_formed(convert.generate_request_from_pb(msg, LIMITS))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "session_id",
        "n",
        "logprobs",
        "ignore_eos",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
        "tools",
    ]
)
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": TEXT | JSON})
BODIES = st.dictionaries(FIELDS, JSON | st.lists(MESSAGE, max_size=3) | TEXT, max_size=8) | JSON


@settings(max_examples=3000, deadline=None)
@given(BODIES)
def test_any_json_body_converts_or_is_refused(body: Any) -> None:
    if not isinstance(body, dict):
        return  # the HTTP side refuses a body that is not an object before this
    for convert_body in (
        lambda: oc.chat_request(body, LIMITS, None),
        lambda: oc.completion_request(body, LIMITS),
        lambda: oc.streaming(body),
    ):
        try:
            result = convert_body()
        except RequestError as e:
            assert str(e)
            continue
        if isinstance(result, GenerateRequest):
            well_formed(result)


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(st.binary(max_size=6), max_size=12),
    st.lists(st.text(min_size=1, max_size=4), max_size=3),
)
def test_the_text_stream_neither_loses_nor_invents_text(
    pieces: list[bytes], stop: list[str]
) -> None:
    """What is sent is the decoded text (a character cut off at the end is dropped) up to the
    first stop string, whatever the bytes and however they are split into tokens."""
    stream = TextStream(tuple(stop))
    sent = "".join(stream.push(p) for p in pieces) + stream.finish()
    whole = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(b"".join(pieces))
    hits = [i for i in (whole.find(s) for s in stop) if i >= 0]
    assert sent == (whole[: min(hits)] if hits else whole)


# --- a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(tiny_model: Path) -> Iterator[Server]:
    srv = start_server(tiny_model, max_tokens=8, default_max_tokens=4)
    yield srv
    srv.stop(drain=0)


def still_serving(srv: Server) -> None:
    answer = httpx.post(
        f"http://127.0.0.1:{srv.http_port}/v1/completions",
        json={"prompt": "Hello", "max_tokens": 2},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text


# Each route with the methods it has (a 405 tells nothing), and now and then one it has not.
ROUTES = st.sampled_from(
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/api/sessions"),
        ("GET", "/api/sessions"),
        ("PATCH", f"/api/sessions/{'0' * 32}"),
        ("DELETE", "/v1/completions"),
    ]
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ROUTES, BODIES | st.binary(max_size=64))
def test_random_http_bodies_get_4xx_never_500(
    target: Server, route: tuple[str, str], body: Any
) -> None:
    method, path = route
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.request(
        method,
        f"http://127.0.0.1:{target.http_port}{path}",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code < 500, (response.status_code, response.text)
    event(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


GRPC_METHODS = st.sampled_from(
    [(m.name, m.server_streaming) for m in pb.DESCRIPTOR.services_by_name["EdgeLLM"].methods]
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(GRPC_METHODS, st.binary(max_size=64))
def test_random_bytes_on_every_grpc_method_never_internal(
    target: Server, method: tuple[str, bool], data: bytes
) -> None:
    """What a client with a broken encoder sends: a status that says so, never INTERNAL."""
    name, streaming = method
    with grpc.insecure_channel(f"127.0.0.1:{target.port}") as channel:
        path = f"/edge_llm.v1.EdgeLLM/{name}"
        raw = {"request_serializer": None, "response_deserializer": None}
        call = channel.unary_stream(path, **raw) if streaming else channel.unary_unary(path, **raw)
        try:
            result = call(data, timeout=120)
            if streaming:
                list(result)
            event(f"{name}: OK")
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.INTERNAL, (name, data, e.details())
            assert e.details()
            event(f"{name}: {e.code().name}")


def test_after_the_http_fuzz_the_server_still_serves(target: Server) -> None:
    still_serving(target)


FRAMES = (
    st.binary(max_size=64)
    | st.text(max_size=64)
    | JSON.map(json.dumps)
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["send", "stop", "ping", "", "SEND"]) | TEXT},
        optional={"content": TEXT | JSON, "session_id": TEXT | JSON, "max_tokens": JSON},
    ).map(json.dumps)
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(FRAMES, min_size=1, max_size=4))
def test_malformed_websocket_frames_get_errors_not_a_dead_server(
    target: Server, frames: list[str | bytes]
) -> None:
    url = f"ws://127.0.0.1:{target.http_port}/api/chat"
    origin = {"Origin": f"http://127.0.0.1:{target.http_port}"}
    with connect(url, additional_headers=origin, open_timeout=60) as ws:
        for frame in frames:
            ws.send(frame)
        # Frames are read in order and each bad one answered at once: the answer to this
        # one comes after theirs (a send's turn may still be streaming; it is not awaited).
        ws.send(json.dumps({"type": "end-of-fuzz"}))
        while True:
            reply = json.loads(ws.recv(timeout=120))
            assert isinstance(reply, dict) and reply.get("type") in (
                "error",
                "start",
                "delta",
                "done",
            ), reply
            if reply["type"] == "error":
                assert reply["message"]
                if "end-of-fuzz" in reply["message"]:
                    break


def test_after_the_websocket_fuzz_the_server_still_serves(target: Server) -> None:
    still_serving(target)
