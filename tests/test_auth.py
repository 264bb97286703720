"""Tokens: the file's rules, the safe default, and a real server that asks for them on gRPC,
HTTP (the openai SDK) and the page's WebSocket, re-reads them on SIGHUP, and makes one when
its file is missing."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import Hold, ServeProcess, make_config, start_server, submissions
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from edge_llm import auth, logs
from edge_llm.config import ConfigError, load_config
from edge_llm.server import Server
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

KIOSK = "kiosk-token-0123456789abcdef"
TERMINAL = "terminal-token-0123456789abcdef"


def token_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- the file -------------------------------------------------------------------------------


def test_a_token_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = token_file(tmp_path / "tokens", f"kiosk {KIOSK}\n", 0o644)
    with pytest.raises(auth.AuthError, match=rf"mode 0644.*chmod 600 {path}"):
        auth.Tokens(path)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("kiosk\n", "line 1: expected a name and a token"),
        ("# nothing\n\n", "has no tokens"),
        ("kiosk short\n", "shorter than 16 characters"),
        (f"kiosk {KIOSK}\nkiosk {TERMINAL}\n", "line 2: 'kiosk' has a token already"),
        (f"kiosk {KIOSK}\nother {KIOSK}\n", "line 2: 'other' has the same token"),
    ],
)
def test_a_malformed_token_file_says_where(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(auth.AuthError, match=error) as refused:
        auth.Tokens(token_file(tmp_path / "tokens", text))
    assert KIOSK not in str(refused.value)  # never a token in a message


def test_tokens_name_their_caller(tmp_path: Path) -> None:
    hashed = "till-#-0123456789abcdef"  # "#" inside a token is the token's
    path = token_file(
        tmp_path / "tokens", f"# the shop\nkiosk {KIOSK}  # by the door\ntill {hashed}\n"
    )
    tokens = auth.Tokens(path)
    assert tokens.caller(KIOSK) == auth.Caller("kiosk")
    assert tokens.caller(hashed) == auth.Caller("till")
    assert tokens.caller(KIOSK + "x") is None and tokens.caller("") is None
    with pytest.raises(auth.UnauthenticatedError, match="needs a token"):
        auth.check(tokens, "")
    with pytest.raises(auth.UnauthenticatedError, match="not one this server knows"):
        auth.check(tokens, TERMINAL)
    assert auth.check(None, "") == auth.ANONYMOUS  # no tokens configured


def test_reload_keeps_the_old_tokens_when_the_file_goes_bad(tmp_path: Path) -> None:
    path = token_file(tmp_path / "tokens", f"kiosk {KIOSK}\n")
    tokens = auth.Tokens(path)
    token_file(path, f"terminal {TERMINAL}\n")
    tokens.reload()
    assert tokens.caller(TERMINAL) and not tokens.caller(KIOSK)
    path.chmod(0o640)
    tokens.reload()  # logged, not raised
    assert tokens.caller(TERMINAL)
    token_file(path, "# everyone's access taken back\n")
    tokens.reload()  # a file emptied of tokens revokes them all
    assert not tokens.caller(TERMINAL)


def test_a_missing_token_file_is_made_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "tokens"
    tokens = auth.Tokens(path)
    assert tokens.made and tokens.caller(tokens.made) == auth.Caller(auth.GENERATED_NAME)
    assert path.stat().st_mode & 0o777 == 0o600


def test_bearer_and_websocket_subprotocol() -> None:
    assert auth.bearer(f"Bearer {KIOSK}") == KIOSK
    assert auth.bearer(f"bearer  {KIOSK} ") == KIOSK
    assert auth.bearer(f"Basic {KIOSK}") == "" and auth.bearer(None) == ""
    offered = base64.urlsafe_b64encode(KIOSK.encode()).decode().rstrip("=")
    assert auth.ws_token(["edge-llm", f"bearer.{offered}"]) == KIOSK
    assert auth.ws_token(["edge-llm", "bearer.%%%"]) == ""


# --- the safe default -------------------------------------------------------------------------


def test_every_address_without_tokens_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"0\.0\.0\.0:50051 without tokens.*--auth-tokens.*--insecure"
    ):
        load_config({"host": "0.0.0.0"}, env={})
    with pytest.raises(ConfigError, match=r"\[::\]:8080 without tokens"):
        load_config({"http_listen": "[::]:8080"}, env={})
    assert load_config({"host": "0.0.0.0", "auth_tokens": "/t"}, env={}).exposed
    assert load_config({"host": "0.0.0.0", "insecure": True}, env={}).insecure
    assert not load_config({"host": "::1", "http_listen": "localhost:8080"}, env={}).exposed


def test_serve_on_every_address_without_tokens_exits_with_what_to_add() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_llm", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--auth-tokens FILE" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


# --- a server that asks for them ----------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    token_file(tokens, f"kiosk {KIOSK}\nterminal {TERMINAL}\n")
    srv = start_server(tiny_model, auth_tokens=str(tokens))
    yield srv
    srv.stop(drain=0)


def with_token(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_grpc_calls_need_a_token_health_does_not(guarded: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = pb_grpc.EdgeLLMStub(channel)
        for metadata, needs in (((), "needs a token"), (with_token(KIOSK[::-1]), "not one")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetInfo(pb.GetInfoRequest(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert needs in (refused.value.details() or "")
        request = pb.GenerateRequest(max_tokens=4)
        request.messages.add(role="user", content="Hi")
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(stub.Generate(request, metadata=with_token(KIOSK)))
        assert answer[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter([ask])))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (listed,) = reflection.ServerReflectionInfo(iter([ask]), metadata=with_token(TERMINAL))
        assert listed.list_services_response.service


def test_the_openai_sdk_uses_its_api_key_as_the_token(guarded: Server) -> None:
    base = f"http://127.0.0.1:{guarded.http_port}"
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert "not one this server knows" in str(refused.value)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KIOSK, max_retries=0)
    answer = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert answer.choices[0].finish_reason
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/").status_code == 200  # the page's files: no data in them
    for path in ("/metrics", "/api/sessions", "/api/info"):
        refused_http = httpx.get(base + path)
        assert refused_http.status_code == 401, path
        assert refused_http.json()["error"]["code"] == "invalid_api_key"
        assert refused_http.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(base + path, headers={"Authorization": f"Bearer {KIOSK}"}).is_success


def test_the_pages_websocket_offers_its_token_as_a_subprotocol(guarded: Server) -> None:
    url = f"ws://127.0.0.1:{guarded.http_port}/api/chat"
    origin = {"Origin": f"http://127.0.0.1:{guarded.http_port}"}
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers=origin, subprotocols=["edge-llm"]).close()
    assert refused.value.response.status_code == 403
    offered = base64.urlsafe_b64encode(KIOSK.encode()).decode().rstrip("=")
    protocols = ["edge-llm", f"bearer.{offered}"]
    with connect(url, additional_headers=origin, subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "edge-llm"


def test_the_cli_sends_edge_llm_token(guarded: Server) -> None:
    cmd = [sys.executable, "-m", "edge_llm", "info", "--address", f"127.0.0.1:{guarded.port}"]
    env = {k: v for k, v in os.environ.items() if k != "EDGE_LLM_TOKEN"}
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "EDGE_LLM_TOKEN" in refused.stderr
    ok = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "EDGE_LLM_TOKEN": TERMINAL}, timeout=60
    )
    assert ok.returncode == 0, ok.stderr


# --- the process: SIGHUP, and a token of its own -----------------------------------------------


def test_sighup_rereads_the_tokens_and_calls_go_on(tiny_model: Path, tmp_path: Path) -> None:
    path = token_file(tmp_path / "tokens", f"kiosk {KIOSK}\n")
    serve = ServeProcess(tiny_model, "--auth-tokens", str(path))
    try:
        serve.wait_until_serving()
        with grpc.insecure_channel(f"127.0.0.1:{serve.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            stub.GetInfo(pb.GetInfoRequest(), metadata=with_token(KIOSK))
            token_file(path, f"terminal {TERMINAL}\n")
            serve.proc.send_signal(signal.SIGHUP)
            serve.wait_for_log("tokens re-read")
            stub.GetInfo(pb.GetInfoRequest(), metadata=with_token(TERMINAL))
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetInfo(pb.GetInfoRequest(), metadata=with_token(KIOSK))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert KIOSK not in serve.log and TERMINAL not in serve.log
    finally:
        serve.kill()


def test_a_token_it_makes_is_printed_once_never_logged(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "state" / "tokens"
    serve = ServeProcess(tiny_model, "--auth-tokens", str(path))
    try:
        serve.wait_until_serving()
        url = serve.wait_for_printed("#token=")
        token = url.split("#token=")[1].strip()
        assert f"127.0.0.1:{serve.http_port}/#token=" in url
        assert path.read_text().split()[-2:] == [auth.GENERATED_NAME, token]
        assert token not in serve.log
        with grpc.insecure_channel(f"127.0.0.1:{serve.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            stub.GetInfo(pb.GetInfoRequest(), metadata=with_token(token))
    finally:
        serve.kill()
    again = ServeProcess(tiny_model, "--auth-tokens", str(path))
    try:
        again.wait_until_serving()
        assert not any("#token=" in line for line in again.printed)
        assert path.read_text().split()[-1] == token  # kept
    finally:
        again.kill()


def test_under_the_journal_a_made_token_is_not_shown(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, caplog
) -> None:
    """Under systemd stdout is the journal, which keeps everything for whoever reads logs: the
    server says where the token is instead."""
    journal = tmp_path / "journal"
    journal.touch()
    st = journal.stat()
    with journal.open() as stream:
        assert logs.is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    srv = Server(make_config(tiny_model, auth_tokens=str(tmp_path / "tokens")))
    assert srv.tokens is not None and srv.tokens.made
    monkeypatch.setattr(logs, "is_journal", lambda stream, env=os.environ: True)
    srv._show_made_token(srv.tokens.made)
    assert srv.tokens.made not in capsys.readouterr().out + caplog.text
    assert f"sudo cat {tmp_path / 'tokens'}" in caplog.text


def test_a_session_is_its_creators_alone(guarded: Server) -> None:
    """Another token's holder gets NOT_FOUND for it, whatever it asks, and lists only its own;
    over HTTP (the page's API) the same."""
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        stub = pb_grpc.EdgeLLMStub(channel)
        kiosk, terminal = with_token(KIOSK), with_token(TERMINAL)
        created = stub.CreateSession(pb.CreateSessionRequest(title="the kiosk's"), metadata=kiosk)
        session_id = created.session.id
        turn = pb.GenerateRequest(session_id=session_id, max_tokens=4)
        turn.messages.add(role="user", content="Hi")
        assert list(stub.Generate(turn, metadata=kiosk))[-1].finish_reason
        attempts = {
            "GetSession": lambda: stub.GetSession(
                pb.GetSessionRequest(id=session_id), metadata=terminal
            ),
            "Generate": lambda: list(stub.Generate(turn, metadata=terminal)),
            "UpdateSession": lambda: stub.UpdateSession(
                pb.UpdateSessionRequest(id=session_id, title="mine"), metadata=terminal
            ),
            "DeleteSession": lambda: stub.DeleteSession(
                pb.DeleteSessionRequest(id=session_id), metadata=terminal
            ),
        }
        for name, attempt in attempts.items():
            with pytest.raises(grpc.RpcError) as refused:
                attempt()
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, name
        listed = stub.ListSessions(pb.ListSessionsRequest(page_size=100), metadata=terminal)
        assert session_id not in {s.id for s in listed.sessions}
        mine = stub.ListSessions(pb.ListSessionsRequest(page_size=100), metadata=kiosk)
        assert session_id in {s.id for s in mine.sessions}
        kept = stub.GetSession(pb.GetSessionRequest(id=session_id), metadata=kiosk).session
        assert kept.title == "the kiosk's" and len(kept.messages) == 2

    base = f"http://127.0.0.1:{guarded.http_port}/api/sessions"
    as_terminal = {"Authorization": f"Bearer {TERMINAL}"}
    assert httpx.get(f"{base}/{session_id}", headers=as_terminal).status_code == 404
    listed_http = httpx.get(base, headers=as_terminal).json()["sessions"]
    assert session_id not in {s["id"] for s in listed_http}
    as_kiosk = {"Authorization": f"Bearer {KIOSK}"}
    assert httpx.get(f"{base}/{session_id}", headers=as_kiosk).json()["title"] == "the kiosk's"


def test_a_page_whose_token_is_removed_is_refused_at_its_next_message(
    tiny_model: Path, tmp_path: Path
) -> None:
    path = token_file(tmp_path / "tokens", f"kiosk {KIOSK}\nterminal {TERMINAL}\n")
    srv = start_server(tiny_model, auth_tokens=str(path))
    try:
        url = f"ws://127.0.0.1:{srv.http_port}/api/chat"
        origin = {"Origin": f"http://127.0.0.1:{srv.http_port}"}
        offered = base64.urlsafe_b64encode(KIOSK.encode()).decode().rstrip("=")
        protocols = ["edge-llm", f"bearer.{offered}"]
        with connect(url, additional_headers=origin, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            token_file(path, f"terminal {TERMINAL}\n")
            srv.reload()  # what SIGHUP does
            ws.send('{"type": "send", "session_id": "' + "0" * 32 + '", "content": "Hi"}')
            refused = json.loads(ws.recv(timeout=60))
            assert refused["type"] == "error" and "token was removed" in refused["message"]
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    finally:
        srv.stop(drain=0)


def test_one_client_cannot_evict_or_starve_the_others(tiny_model: Path, tmp_path: Path) -> None:
    tokens = token_file(tmp_path / "tokens", f"kiosk {KIOSK}\nterminal {TERMINAL}\n")
    srv = start_server(
        tiny_model, auth_tokens=str(tokens), parallel=1, client_max_sessions=2,
        client_queue_depth=1,
    )  # fmt: skip
    kiosk, terminal = with_token(KIOSK), with_token(TERMINAL)
    calls: list[grpc.Call] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)

            def create(title: str, who: tuple[tuple[str, str], ...]) -> pb.Session:
                return stub.CreateSession(
                    pb.CreateSessionRequest(title=title), metadata=who
                ).session

            theirs = create("the terminal's", terminal)
            mine = [create(f"the kiosk's {n}", kiosk) for n in range(3)]
            # The kiosk's third session made room by removing its own oldest, not another's.
            with pytest.raises(grpc.RpcError) as gone:
                stub.GetSession(pb.GetSessionRequest(id=mine[0].id), metadata=kiosk)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            assert stub.GetSession(pb.GetSessionRequest(id=theirs.id), metadata=terminal)
            listed = stub.ListSessions(pb.ListSessionsRequest(page_size=10), metadata=kiosk)
            assert {s.id for s in listed.sessions} == {mine[1].id, mine[2].id}

            # One request runs (held at its first step), then each client may queue one.
            scheduler = srv.core.loaded.scheduler
            hold = Hold(scheduler, lambda job: job.owner == "kiosk")
            request = pb.GenerateRequest(max_tokens=8)
            request.messages.add(role="user", content="Hi")
            calls.append(stub.Generate(request, metadata=kiosk))
            assert hold.reached.wait(60)
            queued = submissions(scheduler, 2)
            calls.append(stub.Generate(request, metadata=kiosk))
            calls.append(stub.Generate(request, metadata=terminal))
            assert queued.wait(60)
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.Generate(request, metadata=kiosk))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 of kiosk's requests are waiting" in (refused.value.details() or "")
            over_http = httpx.post(
                f"http://127.0.0.1:{srv.http_port}/v1/chat/completions",
                json={"model": "any", "messages": [{"role": "user", "content": "Hi"}]},
                headers={"Authorization": f"Bearer {KIOSK}"},
                timeout=60,
            )
            assert over_http.status_code == 429
            assert over_http.json()["error"]["code"] == "queue_full"
            hold.release()
            for call in calls:  # all three were taken, and answer
                *_, last = call  # type: ignore[misc]
                assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    finally:
        for call in calls:
            call.cancel()
        srv.stop(drain=0)
