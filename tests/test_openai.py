"""The OpenAI-style HTTP API, as the clients people use speak it: the official `openai` SDK
(sync and async, streaming and not), langchain-openai, and raw HTTP for what SDKs hide.

Response objects are checked against JSON schemas of OpenAI's own types: the SDK's models are
generated from OpenAI's OpenAPI description, and pydantic gives their JSON schema.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from helpers import Hold, make_config, start_server, submissions
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

HI = [{"role": "user", "content": "Say hello."}]


def conforms(obj: dict[str, Any], model: Any) -> None:
    jsonschema.validate(obj, model.model_json_schema())


@pytest.fixture(scope="module")
def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.http_port}/v1"


@pytest.fixture(scope="module")
def client(base: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base, api_key="unused", max_retries=0) as c:
        yield c


def sse(response: httpx.Response) -> list[Any]:
    """The data of each server-sent event, JSON-decoded except [DONE]."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_completion_with_the_sdk(client: openai.OpenAI, base: str) -> None:
    answer = client.chat.completions.create(model="any", messages=HI, max_tokens=16, seed=1)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 16
    assert answer.usage.prompt_tokens_details is not None
    assert answer.model == client.models.list().data[0].id
    raw = httpx.post(
        f"{base}/chat/completions", json={"messages": HI, "max_tokens": 16, "seed": 1}
    ).json()
    conforms(raw, ChatCompletion)
    assert raw["choices"][0]["message"]["content"] == choice.message.content  # same seed


def test_chat_streams_chunks_then_usage_then_done(client: openai.OpenAI, base: str) -> None:
    stream = client.chat.completions.create(
        model="any",
        messages=HI,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2  # streamed, not one block
    assert chunks[0].choices[0].delta.role == "assistant"
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert len(texts) <= usage.completion_tokens <= 12  # a chunk holds one token or more

    body = {"messages": HI, "max_tokens": 12, "stream": True, "temperature": 0}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{base}/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        conforms(event, ChatCompletionChunk)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "".join(
        texts
    )


def test_async_client_streams(base: str) -> None:
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as c:
            stream = await c.chat.completions.create(
                model="any", messages=HI, max_tokens=8, stream=True
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    assert asyncio.run(run())


def test_completions_raw_prompt(client: openai.OpenAI, base: str) -> None:
    done = client.completions.create(model="any", prompt="The capital of France is", max_tokens=8)
    assert done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")
    raw = httpx.post(f"{base}/completions", json={"prompt": "One, two,", "max_tokens": 8}).json()
    conforms(raw, Completion)
    stream = client.completions.create(model="any", prompt="One, two,", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices)


def test_models(client: openai.OpenAI, base: str) -> None:
    (model,) = client.models.list().data
    assert model.id.endswith("q4_1") and " " not in model.id  # the file's name
    conforms(httpx.get(f"{base}/models/{model.id}").json(), Model)
    with pytest.raises(openai.NotFoundError, match="this server serves"):
        client.models.retrieve("gpt-4o")


def test_sampling_fields_are_honoured(client: openai.OpenAI, server: Server) -> None:
    recent = server.core.loaded.scheduler.recent  # type: ignore[union-attr]
    client.chat.completions.create(
        model="any",
        messages=HI,
        max_completion_tokens=7,
        max_tokens=99,  # the newer name wins
        temperature=0.3,
        top_p=0.5,
        seed=42,
        stop=["\n\n", "END"],
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1, "an_unknown_field": 1},
    )
    req = recent[-1].request
    s = req.sampling
    assert req.max_tokens == 7 and req.stop == ("\n\n", "END")
    assert (s.temperature, s.top_p, s.seed, s.top_k) == (0.3, 0.5, 42, 5)
    assert (s.min_p, s.repeat_penalty, s.presence_penalty, s.frequency_penalty) == (
        0.1,
        1.1,
        0.5,
        -0.25,
    )
    client.completions.create(model="any", prompt="x", max_tokens=3, stop="END")
    assert recent[-1].request.stop == ("END",)


def test_a_stop_string_ends_the_answer(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model="any", messages=HI, max_tokens=12, temperature=0)
    text = full.choices[0].message.content or ""
    word = text.split()[1]  # stop at the answer's second word
    cut = client.chat.completions.create(
        model="any", messages=HI, max_tokens=12, temperature=0, stop=word
    )
    assert cut.choices[0].message.content == text[: text.index(word)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"messages": HI, "temperature": 5}, 400, "temperature must be in [0, 2]; got 5"),
        ({"messages": HI, "temperature": "warm"}, 400, "temperature must be a number"),
        ({"messages": HI, "max_tokens": 100_000}, 400, "max_tokens must be in [1, 1024]"),
        ({"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens must be in"),
        ({"messages": HI, "n": 2}, 400, "n must be 1"),
        ({"messages": HI, "tools": [{"type": "function"}]}, 400, "tools is not supported"),
        ({"messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ({"messages": HI, "stop": 3}, 400, "stop must be a string or an array of strings"),
        ({"messages": HI, "stream": "yes"}, 400, "stream must be true or false"),
        ({"messages": HI, "temperature": 10**400}, 400, "temperature must be in [0, 2]"),
        ({"messages": HI, "seed": -1}, 400, "seed must be below"),
        ({"messages": HI, "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
        ({"messages": []}, 400, "messages is empty"),
        ({}, 400, "messages is required"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role must be"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
        ({"messages": HI, "session_id": "nope"}, 400, "is not a session id"),
        ({"messages": HI, "session_id": "0" * 32}, 404, "no session"),
    ],
)
def test_bad_requests_get_an_error_object(base: str, body: dict, status: int, says: str) -> None:
    r = httpx.post(f"{base}/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert says in error["message"] and error["type"] and error["code"]


def test_malformed_bodies_and_routes(base: str) -> None:
    json_type = {"Content-Type": "application/json"}
    bad_json = httpx.post(f"{base}/chat/completions", content=b"{nope", headers=json_type)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    huge_int = httpx.post(
        f"{base}/completions", content=b'{"seed": ' + b"9" * 5000 + b"}", headers=json_type
    )
    assert huge_int.status_code == 400
    # A form or text/plain POST is what another site can make a browser send: refused.
    form = httpx.post(f"{base}/completions", data={"prompt": "x"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]
    text = httpx.post(
        f"{base}/completions", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert text.status_code == 415
    # A name pointed at loopback by some web page (DNS rebinding) is not this server's.
    rebound = httpx.get(f"{base}/models", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403 and "loopback" in rebound.json()["error"]["message"]
    assert httpx.get(f"{base}/models", headers={"Host": "localhost"}).status_code == 200
    not_object = httpx.post(f"{base}/chat/completions", json=[1])
    assert "must be a JSON object" in not_object.json()["error"]["message"]
    huge = httpx.post(f"{base}/completions", content=b"x" * (1024 * 1024 + 1), headers=json_type)
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]
    nowhere = httpx.get(f"{base}/nothing-here")
    assert (
        nowhere.status_code == 404 and "/v1/chat/completions" in nowhere.json()["error"]["message"]
    )
    wrong_method = httpx.get(f"{base}/chat/completions")
    assert (
        wrong_method.status_code == 405 and "not allowed" in wrong_method.json()["error"]["message"]
    )


def test_a_session_deleted_mid_answer_is_404_not_500(base: str, server: Server) -> None:
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    sid = httpx.post(f"{base.removesuffix('/v1')}/api/sessions", json={}).json()["id"]
    hold = Hold(scheduler, lambda job: job.request.session_id == sid)
    result: list[httpx.Response] = []
    body = {"messages": HI, "max_tokens": 4, "session_id": sid}
    asking = threading.Thread(
        target=lambda: result.append(httpx.post(f"{base}/chat/completions", json=body))
    )
    try:
        asking.start()
        assert hold.reached.wait(60)
        assert httpx.delete(f"{base.removesuffix('/v1')}/api/sessions/{sid}").status_code == 204
    finally:
        hold.release()
    asking.join(60)
    assert result[0].status_code == 404 and "deleted" in result[0].json()["error"]["message"]


def test_a_session_continues_over_http(client: openai.OpenAI, server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.EdgeLLMStub(ch)
        session = stub.CreateSession(pb.CreateSessionRequest(system_prompt="Be brief.")).session
        first = client.chat.completions.create(
            model="any", messages=HI, max_tokens=6, extra_body={"session_id": session.id}
        )
        assert first.model_extra and first.model_extra["session_id"] == session.id
        stream = client.chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "Again."}],
            max_tokens=6,
            stream=True,
            extra_body={"session_id": session.id},
        )
        second = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        stored = stub.GetSession(pb.GetSessionRequest(id=session.id)).session.messages
        assert [(m.role, m.content) for m in stored] == [
            ("user", "Say hello."),
            ("assistant", first.choices[0].message.content),
            ("user", "Again."),
            ("assistant", second),
        ]
        with pytest.raises(openai.BadRequestError, match="only the new message"):
            client.chat.completions.create(
                model="any", messages=HI * 2, extra_body={"session_id": session.id}
            )


def long_answer(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Count:", "max_tokens": 1000, "ignore_eos": True, **fields}


def test_a_client_that_disconnects_stops_its_generation_within_one_token(
    client: openai.OpenAI, base: str, server: Server
) -> None:
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    hold = Hold(scheduler, lambda job: job.stats.completion_tokens >= 3)
    try:
        with httpx.stream("POST", f"{base}/completions", json=long_answer(stream=True)):
            assert hold.reached.wait(60)  # the worker waits after the third token
            job = hold.job
            assert job is not None
        # The response is closed: the server sees the disconnect while the worker still waits.
        assert job.cancelled.wait(60)
    finally:
        hold.release()
    client.completions.create(model="any", prompt="x", max_tokens=1)  # after it, in line
    assert job.stats.completion_tokens == 3 and job.stats.finish_reason is None


def test_a_queued_request_whose_client_leaves_never_runs(base: str, server: Server) -> None:
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    hold = Hold(scheduler, lambda job: job.request.prompt == "Hold:")
    queued = submissions(scheduler, 2)
    try:
        body = long_answer(prompt="Hold:", max_tokens=2)
        blocker = threading.Thread(
            target=lambda: httpx.post(f"{base}/completions", json=body), daemon=True
        )
        blocker.start()
        assert hold.reached.wait(60)
        with httpx.stream("POST", f"{base}/completions", json=long_answer(stream=True)):
            assert queued.wait(60)
            (job,) = list(scheduler._waiting)
        assert job.cancelled.wait(60)
        assert scheduler.waiting == 0 and job.started_at is None  # left the queue, never ran
    finally:
        hold.release()
    blocker.join(60)


@pytest.fixture(scope="module")
def one_slot(tiny_model: Path) -> Iterator[Server]:
    srv = start_server(tiny_model, queue_depth=1)
    yield srv
    srv.stop(drain=0)


def test_a_full_queue_is_429_with_retry_after(one_slot: Server) -> None:
    base = f"http://127.0.0.1:{one_slot.http_port}/v1"
    scheduler = one_slot.core.loaded.scheduler  # type: ignore[union-attr]
    hold = Hold(scheduler, lambda job: True)
    threads = [
        threading.Thread(
            target=lambda: httpx.post(f"{base}/completions", json=long_answer(max_tokens=2)),
            daemon=True,
        )
        for _ in range(2)
    ]
    try:
        threads[0].start()
        assert hold.reached.wait(60)  # one running (held)
        waiting = submissions(scheduler, 1)
        threads[1].start()
        assert waiting.wait(60)  # and one waiting: the queue is full
        r = httpx.post(f"{base}/completions", json=long_answer(max_tokens=2))
        assert r.status_code == 429 and r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="any", prompt="x", max_tokens=2)
    finally:
        hold.release()
    for t in threads:
        t.join(60)


def test_loading_and_stopping_are_503(tiny_model: Path) -> None:
    srv = Server(make_config(tiny_model))
    srv.start()  # listening, the model not loaded yet
    base = f"http://127.0.0.1:{srv.http_port}"
    stopping = threading.Thread(target=srv.stop, kwargs={"drain": 60})
    try:
        assert httpx.get(f"{base}/health").status_code == 503
        loading = httpx.post(f"{base}/v1/chat/completions", json={"messages": HI})
        assert loading.status_code == 503 and "loading" in loading.json()["error"]["message"]
        assert loading.headers["retry-after"].isdigit()
        srv.load()
        assert httpx.get(f"{base}/health").json() == {"status": "serving"}

        # Stopping, with an answer still running: the port stays open while it drains.
        scheduler = srv.core.loaded.scheduler  # type: ignore[union-attr]
        hold = Hold(scheduler, lambda job: True)
        running = threading.Thread(
            target=lambda: httpx.post(f"{base}/v1/completions", json=long_answer(max_tokens=2)),
            daemon=True,
        )
        running.start()
        assert hold.reached.wait(60)
        stopping.start()
        while httpx.get(f"{base}/health").status_code == 200:  # until stop() has begun
            pass
        refused = httpx.post(f"{base}/v1/chat/completions", json={"messages": HI})
        assert refused.status_code == 503 and "shutting down" in refused.text
        hold.release()
        running.join(60)
    finally:
        if stopping.ident is None:  # failed before the stop began
            srv.stop(drain=0)
        else:
            stopping.join(60)


def test_langchain_openai(base: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base, api_key="unused", model="any", max_tokens=8, max_retries=0)
    assert llm.invoke("Say hello.").content
    assert "".join(str(part.content) for part in llm.stream("Say hello."))


def test_metrics_count_both_apis(client: openai.OpenAI, base: str, server: Server) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(base.removesuffix("/v1") + "/metrics").text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("edge_llm_")
        }

    before = scrape()
    client.completions.create(
        model="any", prompt="x", max_tokens=3, extra_body={"ignore_eos": True}
    )
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        list(
            pb_grpc.EdgeLLMStub(ch).Generate(
                pb.GenerateRequest(prompt="y", max_tokens=2, ignore_eos=True)
            )
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="any", prompt="x", temperature=9)
    after = scrape()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('edge_llm_requests_total{api="openai",outcome="length"}') == 1
    assert grew('edge_llm_requests_total{api="grpc",outcome="length"}') == 1
    assert grew('edge_llm_requests_total{api="openai",outcome="refused"}') == 1
    assert grew("edge_llm_completion_tokens_total") == 5
    assert grew("edge_llm_time_to_first_token_seconds_count") == 2
    for gauge in ("queue_waiting", "queue_running", "sessions", "memory_budget_bytes"):
        assert f"edge_llm_{gauge}" in after
    assert after["edge_llm_process_resident_memory_bytes"] > 50e6
