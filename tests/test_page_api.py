"""The chat page's API over real HTTP and a real WebSocket: sessions, the streaming protocol
(send, deltas, done; stop; errors), regenerate and edit, and the same-origin rule."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from helpers import Hold
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def base(server: Server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
def ws(server: Server) -> Iterator[ClientConnection]:
    with connect(f"ws://127.0.0.1:{server.http_port}/api/chat") as socket:
        yield socket


def new_session(base: str, **fields: Any) -> dict[str, Any]:
    r = httpx.post(f"{base}/api/sessions", json={"defaults": {"temperature": 0}, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def frames_until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    out = []
    while True:
        frame = json.loads(ws.recv(timeout=120))
        out.append(frame)
        if frame["type"] in ("done", "error"):
            return out


def send(ws: ClientConnection, session_id: str, content: str, **fields: Any) -> None:
    ws.send(json.dumps({"type": "send", "session_id": session_id, "content": content, **fields}))


def test_sessions_over_http(base: str, server: Server) -> None:
    made = new_session(base, system_prompt="Be brief.", title="", defaults={"max_tokens": 12})
    assert made["defaults"] == {"max_tokens": 12} and made["title"] == ""
    sid = made["id"]
    listed = httpx.get(f"{base}/api/sessions", params={"page_size": 1000}).json()["sessions"]
    assert sid in [s["id"] for s in listed]

    patched = httpx.patch(
        f"{base}/api/sessions/{sid}",
        json={
            "title": "Harbours",
            "system_prompt": "In French.",
            "defaults": {"top_p": 0.5},
        },
    ).json()
    assert (patched["title"], patched["system_prompt"]) == ("Harbours", "In French.")
    assert patched["defaults"] == {"top_p": 0.5}
    # gRPC sees the same session (one core, two skins).
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        got = pb_grpc.EdgeLLMStub(ch).GetSession(pb.GetSessionRequest(id=sid)).session
    assert got.title == "Harbours" and got.system_prompt == "In French."

    assert httpx.delete(f"{base}/api/sessions/{sid}").status_code == 204
    gone = httpx.get(f"{base}/api/sessions/{sid}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/api/sessions", {"defaults": {"temperature": 9}}, 400, "temperature must be in"),
        ("POST", "/api/sessions", {"title": 3}, 400, "title must be a string"),
        ("POST", "/api/sessions", {"defaults": []}, 400, "defaults must be an object"),
        ("GET", "/api/sessions/xyz", None, 400, "is not a session id"),
        ("PATCH", "/api/sessions/" + "0" * 32, {"title": "x"}, 404, "no session"),
        ("GET", "/api/sessions?page_size=lots", None, 400, "page_size must be a whole number"),
        ("GET", "/api/sessions?page_token=bogus", None, 400, "page_token"),
    ],
)
def test_bad_session_requests(
    base: str, method: str, path: str, body: Any, status: int, says: str
) -> None:
    r = httpx.request(method, f"{base}{path}", json=body)
    assert r.status_code == status and says in r.json()["error"]["message"]


def test_an_answer_streams_and_is_kept(base: str, ws: ClientConnection) -> None:
    sid = new_session(base, defaults={"temperature": 0, "max_tokens": 16})["id"]
    send(ws, sid, "Tell me about the sea.\nIn detail.")
    frames = frames_until_end(ws)
    assert frames[0]["type"] == "start" and frames[0]["request_id"] > 0
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    done = frames[-1]
    assert len(deltas) > 1 and done["type"] == "done" and done["kept"] is True
    assert done["finish_reason"] in ("stop", "length") and done["usage"]["completion_tokens"] > 0
    assert (
        done["timings"]["decode_tokens_per_second"] >= 0
        and "time_to_first_token_ms" in done["timings"]
    )
    session = httpx.get(f"{base}/api/sessions/{sid}").json()
    assert session["messages"] == [
        {"role": "user", "content": "Tell me about the sea.\nIn detail."},
        {"role": "assistant", "content": "".join(deltas)},
    ]
    assert session["title"] == "Tell me about the sea."  # the first line of the first question


def test_stop_cancels_within_one_token_and_keeps_nothing(
    base: str, server: Server, ws: ClientConnection
) -> None:
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    sid = new_session(base, defaults={"max_tokens": 1000})["id"]
    hold = Hold(scheduler, lambda job: job.stats.completion_tokens >= 2)
    try:
        send(ws, sid, "Count to a thousand.")
        assert hold.reached.wait(60)
        job = hold.job
        assert job is not None
        ws.send(json.dumps({"type": "stop"}))
        assert job.cancelled.wait(60)  # while the worker still waits after token 2
    finally:
        hold.release()
    done = frames_until_end(ws)[-1]
    assert done == done | {"type": "done", "finish_reason": "cancelled", "kept": False}
    assert job.stats.completion_tokens == 2
    assert httpx.get(f"{base}/api/sessions/{sid}").json()["messages"] == []
    send(ws, sid, "Hi")  # the session is free again at once, on the same socket
    assert frames_until_end(ws)[-1]["kept"] is True


def test_closing_the_page_cancels_its_answer(base: str, server: Server) -> None:
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    sid = new_session(base, defaults={"max_tokens": 1000})["id"]
    hold = Hold(scheduler, lambda job: job.stats.completion_tokens >= 2)
    try:
        with connect(f"ws://127.0.0.1:{server.http_port}/api/chat") as socket:
            send(socket, sid, "Count to a thousand.")
            assert hold.reached.wait(60)
            job = hold.job
            assert job is not None
        assert job.cancelled.wait(60)
    finally:
        hold.release()


def test_regenerate_and_edit_replace_the_last_turn(base: str, ws: ClientConnection) -> None:
    sid = new_session(base, defaults={"max_tokens": 8})["id"]
    for question in ("First question.", "Second question."):
        send(ws, sid, question)
        end = frames_until_end(ws)[-1]
        assert end.get("kept"), end
    send(ws, sid, "Second question, edited.", replace_last=True, temperature=1.5, seed=7)
    edited = frames_until_end(ws)
    messages = httpx.get(f"{base}/api/sessions/{sid}").json()["messages"]
    assert [m["content"] for m in messages[::2]] == ["First question.", "Second question, edited."]
    assert messages[-1]["content"] == "".join(f["text"] for f in edited if f["type"] == "delta")
    assert len(messages) == 4


def test_socket_errors_are_frames_and_the_socket_goes_on(base: str, ws: ClientConnection) -> None:
    sid = new_session(base)["id"]
    cases = [
        ("not json", 400, "JSON"),
        (json.dumps([1]), 400, "JSON object"),
        (json.dumps({"type": "dance"}), 400, "unknown frame type"),
        (json.dumps({"type": "send", "content": "x"}), 400, "session_id is required"),
        (json.dumps({"type": "send", "session_id": sid, "content": ""}), 400, "content must"),
        (json.dumps({"type": "send", "session_id": "0" * 32, "content": "x"}), 404, "no session"),
        (
            json.dumps({"type": "send", "session_id": sid, "content": "x", "temperature": 7}),
            400,
            "temperature must be in [0, 2]",
        ),
        (
            json.dumps({"type": "send", "session_id": sid, "content": "x", "replace_last": True}),
            400,
            "no turn to replace",
        ),
    ]
    for text, status, says in cases:
        ws.send(text)
        error = json.loads(ws.recv(timeout=60))
        assert error["type"] == "error" and error["status"] == status and says in error["message"]
    send(ws, sid, "Hi", max_tokens=2)
    assert frames_until_end(ws)[-1]["type"] == "done"


def test_one_answer_at_a_time_per_socket_and_per_session(
    base: str, server: Server, ws: ClientConnection
) -> None:
    scheduler = server.core.loaded.scheduler  # type: ignore[union-attr]
    sid = new_session(base, defaults={"max_tokens": 1000})["id"]
    hold = Hold(scheduler, lambda job: job.stats.completion_tokens >= 1)
    try:
        send(ws, sid, "Count to a thousand.")
        assert hold.reached.wait(60)
        send(ws, sid, "And again.")
        first = frames_until_end(ws)  # start, maybe a delta, then the refusal of the second
        assert first[0]["type"] == "start" and first[-1]["type"] == "error"
        assert "still streaming" in first[-1]["message"]
        with connect(f"ws://127.0.0.1:{server.http_port}/api/chat") as other:
            send(other, sid, "From another tab.")
            clash = json.loads(other.recv(timeout=60))
        assert clash["status"] == 409 and clash["code"] == "session_busy"
        ws.send(json.dumps({"type": "stop"}))
    finally:
        hold.release()
    assert frames_until_end(ws)[-1]["finish_reason"] == "cancelled"


def test_another_origin_is_refused(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.http_port}/api/chat"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, origin="http://evil.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    with connect(url, origin=f"http://127.0.0.1:{server.http_port}") as same:  # type: ignore[arg-type]
        same.send(json.dumps({"type": "stop"}))  # nothing running: ignored
        same.ping().wait(60)


def test_a_frame_over_1_mib_closes_the_socket(ws: ClientConnection) -> None:
    ws.send("x" * (1024 * 1024 + 1))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=60)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_the_page_is_served_from_its_own_origin_only(base: str) -> None:
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert httpx.get(f"{base}/no-such-file.js").status_code == 404
