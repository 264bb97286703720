"""Sessions: conversations kept by the server, their KV caches reused, their turns on disk.

Everything runs the tiny real model, greedy, through real gRPC servers on loopback ports.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import HANG_GUARD, Hold, ServeProcess, freed, start_server
from test_health_reflection import grpcurl

from edge_llm.decoding import Job
from edge_llm.server import Server
from edge_llm.sessions import SessionStore
from edge_llm.types import ChatMessage, NotFoundError, SamplingDefaults, SessionChanges
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

GREEDY = pb.SamplingDefaults(temperature=0, max_tokens=48)
QUESTIONS = [
    "What is the capital of France?",
    "And of Italy?",
    "Which of the two is bigger?",
    "Name a river in each.",
    "Thank you!",
]


def new_session(stub: pb_grpc.EdgeLLMStub, system: str = "You are a geography tutor.") -> str:
    return stub.CreateSession(
        pb.CreateSessionRequest(system_prompt=system, defaults=GREEDY)
    ).session.id


def say(
    stub: pb_grpc.EdgeLLMStub, session_id: str, text: str, **fields: object
) -> tuple[str, pb.GenerateResponse]:
    request = pb.GenerateRequest(session_id=session_id, **fields)
    request.messages.add(role="user", content=text)
    parts, last = [], pb.GenerateResponse()
    for msg in stub.Generate(request, timeout=HANG_GUARD):
        parts.append(msg.text)
        last = msg
    return "".join(parts), last


def last_job(server: Server) -> Job:
    return server.core.loaded.scheduler.recent[-1]  # type: ignore[union-attr]


def history(stub: pb_grpc.EdgeLLMStub, session_id: str) -> list[tuple[str, str]]:
    session = stub.GetSession(pb.GetSessionRequest(id=session_id)).session
    return [(m.role, m.content) for m in session.messages]


def test_a_session_from_create_to_delete(stub) -> None:
    session_id = new_session(stub)
    assert history(stub, session_id) == []
    answer, last = say(stub, session_id, QUESTIONS[0])
    assert answer and last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert history(stub, session_id) == [("user", QUESTIONS[0]), ("assistant", answer)]
    session = stub.GetSession(pb.GetSessionRequest(id=session_id)).session
    assert session.system_prompt == "You are a geography tutor."
    assert session.defaults.temperature == 0 and session.defaults.max_tokens == 48
    assert session.update_time.ToNanoseconds() >= session.create_time.ToNanoseconds() > 0
    listed = stub.ListSessions(pb.ListSessionsRequest(page_size=1000)).sessions
    assert [s.message_count for s in listed if s.id == session_id] == [2]

    stub.DeleteSession(pb.DeleteSessionRequest(id=session_id))
    for call in (
        lambda: stub.GetSession(pb.GetSessionRequest(id=session_id)),
        lambda: say(stub, session_id, "Hello?"),
        lambda: stub.DeleteSession(pb.DeleteSessionRequest(id=session_id)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert session_id in err.value.details()


def test_each_turn_processes_only_its_new_tokens(server, stub) -> None:
    session_id = new_session(stub)
    previous: Job | None = None
    for i, question in enumerate(QUESTIONS):
        say(stub, session_id, question)
        job = last_job(server)
        s = job.stats
        if previous is not None:
            p = previous.stats
            # The cache holds the last prompt and every answer token it evaluated: all of
            # them but one when max_tokens cut the answer (that one is new to the cache).
            cached = p.prompt_tokens + p.completion_tokens - (p.finish_reason.value == "length")
            assert s.prompt_tokens_reused == cached, f"turn {i + 1}"
            assert s.prompt_tokens_processed == s.prompt_tokens - cached, f"turn {i + 1}"
        previous = job
    assert s.prompt_tokens_processed < s.prompt_tokens / 3  # the last turn: mostly reused


def test_three_sessions_taking_turns_keep_their_own_conversations(server, stub) -> None:
    systems = [
        "You are a geography tutor.",
        "You answer in one short sentence.",
        "You are a pirate.",
    ]
    questions = [
        QUESTIONS[:3],
        ["What is 2 + 2?", "And times 3?", "Say it in words."],
        ["Where is the treasure?", "How deep?", "Who buried it?"],
    ]
    ids = [new_session(stub, system) for system in systems]
    answers: list[list[str]] = [[], [], []]
    reused = []
    for turn in range(3):
        for k in range(3):
            answers[k].append(say(stub, ids[k], questions[k][turn])[0])
            reused.append(last_job(server).stats.prompt_tokens_reused)
    # Each session's cache came back after the other two had the engine.
    assert all(r > 0 for r in reused[3:])

    for k in range(3):
        assert history(stub, ids[k]) == [
            (role, text)
            for q, a in zip(questions[k], answers[k], strict=True)
            for role, text in (("user", q), ("assistant", a))
        ]
    # That a cache that comes back holds what it held is checked on the logits themselves
    # (test_batching.py): greedy answers compared across runs can part ways where other
    # sequences' caches lie elsewhere in the shared KV pool (llama.cpp #7052).


@pytest.fixture(scope="module")
def spilling_server(tiny_model: Path) -> Iterator[Server]:
    """No memory for saved caches: every one goes to disk and comes back from it."""
    server = start_server(tiny_model, session_cache_mb=0)
    yield server
    server.stop(drain=0)


def test_caches_spill_to_disk_and_lost_ones_are_rebuilt(spilling_server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{spilling_server.port}") as ch:
        stub = pb_grpc.EdgeLLMStub(ch)
        a, b = new_session(stub), new_session(stub, "You are a pirate.")
        say(stub, a, QUESTIONS[0])
        say(stub, b, "Where is the treasure?")
        say(stub, new_session(stub), "Hi", max_tokens=2)  # b's cache leaves the pool for it
        kv_dir = Path(spilling_server.config.state_dir) / "kv"
        assert (kv_dir / f"{a}.kv").is_file() and (kv_dir / f"{b}.kv").is_file()
        say(stub, a, QUESTIONS[1])  # back from disk
        job = last_job(spilling_server)
        assert job.stats.prompt_tokens_processed < job.stats.prompt_tokens / 2

        # Lost: b's cache file disappears; b's next turn processes its history instead.
        (kv_dir / f"{b}.kv").unlink()
        say(stub, b, "How deep?")
        job = last_job(spilling_server)
        assert job.stats.prompt_tokens_reused < job.stats.prompt_tokens / 2
        # The model saw the whole conversation, from the stored history.
        stored = stub.GetSession(pb.GetSessionRequest(id=b)).session
        conversation = [ChatMessage("system", "You are a pirate.")] + [
            ChatMessage(m.role, m.content) for m in stored.messages[:-1]
        ]
        engine = spilling_server.core.loaded.engine  # type: ignore[union-attr]
        assert job.prompt == engine.tokenize(None, conversation)


def test_two_answers_at_once_in_one_session_are_refused(server, stub) -> None:
    session_id = new_session(stub)
    request = pb.GenerateRequest(session_id=session_id, max_tokens=400, ignore_eos=True)
    request.messages.add(role="user", content="Count to a thousand.")
    first = stub.Generate(request)
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        say(stub, session_id, "Are you there?")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "still answering" in err.value.details()
    conversations = server.core.loaded.conversations
    free = freed(conversations, session_id)
    first.cancel()
    # A cancelled answer is not stored, nor is its question; the session is free at once
    # (once the server has the cancel: a message sent before that gets FAILED_PRECONDITION).
    assert free.wait(30)
    say(stub, session_id, "Hello")
    assert len(history(stub, session_id)) == 2
    for _ in range(5):  # cancel, and send the next message as soon as the cancel is in
        call = stub.Generate(request)
        next(call)
        free = freed(conversations, session_id)
        call.cancel()
        assert free.wait(30)
        say(stub, session_id, "Hello")
    assert len(history(stub, session_id)) == 12
    assert all(content != "Count to a thousand." for _, content in history(stub, session_id))


def test_a_session_deleted_during_its_answer_is_not_brought_back(server, stub) -> None:
    session_id = new_session(stub)
    request = pb.GenerateRequest(session_id=session_id, max_tokens=60, ignore_eos=True)
    request.messages.add(role="user", content="Tell me a story.")
    scheduler = server.core.loaded.scheduler
    hold = Hold(scheduler, lambda job: job.request.session_id == session_id)
    try:
        call = stub.Generate(request)
        assert hold.reached.wait(60)  # mid-answer, however fast the machine
        stub.DeleteSession(pb.DeleteSessionRequest(id=session_id))
    finally:
        hold.release()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "deleted during the answer" in err.value.details()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "raw text"}, "send only the new message"),
        (
            {
                "messages": [
                    pb.Message(role="user", content="a"),
                    pb.Message(role="user", content="b"),
                ]
            },
            "send only the new message",
        ),
        ({"messages": [pb.Message(role="assistant", content="a")]}, "send only the new message"),
        (
            {"messages": [pb.Message(role="user", content="a")], "temperature": 9},
            "temperature must be in",
        ),
    ],
)
def test_bad_session_requests(stub, fields: dict, message: str) -> None:
    session_id = new_session(stub)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(session_id=session_id, **fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_bad_session_settings_and_pages(stub) -> None:
    hi = [pb.Message(role="user", content="hi")]
    bad = [
        lambda: stub.GetSession(pb.GetSessionRequest(id="../../etc/passwd")),
        lambda: stub.DeleteSession(pb.DeleteSessionRequest(id="x" * 20_000)),
        lambda: list(stub.Generate(pb.GenerateRequest(session_id="nope", messages=hi))),
        lambda: stub.CreateSession(pb.CreateSessionRequest(system_prompt="word " * 600)),
        lambda: stub.CreateSession(pb.CreateSessionRequest(defaults=pb.SamplingDefaults(top_p=0))),
        lambda: stub.CreateSession(
            pb.CreateSessionRequest(defaults=pb.SamplingDefaults(max_tokens=10**6))
        ),
        lambda: stub.CreateSession(pb.CreateSessionRequest(system_prompt="x" * 70_000)),
        lambda: stub.ListSessions(pb.ListSessionsRequest(page_size=5000)),
        lambda: stub.ListSessions(pb.ListSessionsRequest(page_token="not-a-token")),
    ]
    for call in bad:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert len(err.value.details()) < 300
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSession(pb.GetSessionRequest(id="0" * 32))  # well formed, but no such session
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_pages_through_every_session_once(stub) -> None:
    mine = {new_session(stub) for _ in range(5)}
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListSessions(pb.ListSessionsRequest(page_size=2, page_token=token))
        seen += [s.id for s in page.sessions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and mine <= set(seen)
    assert pages == (len(seen) + 1) // 2
    assert all(not s.messages for s in page.sessions)  # listings leave the messages out


def test_overflow_drops_the_oldest_turns_but_keeps_the_system_prompt(tiny_model: Path) -> None:
    server = start_server(tiny_model, context_length=384)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            session_id = new_session(stub, "You are terse.")
            long = "Tell me about the sea, the wind and the ships that sail on them. " * 3
            notices = []
            for _ in range(8):
                _, last = say(stub, session_id, long, max_tokens=40)
                notices.append(last.notice)
            dropped = [n for n in notices if n]
            assert dropped and "oldest messages were dropped" in dropped[0]
            session = stub.GetSession(pb.GetSessionRequest(id=session_id)).session
            assert session.dropped_messages > 0
            assert session.message_count == 16 - session.dropped_messages
            assert session.system_prompt == "You are terse."
            job = last_job(server)
            assert job.request.messages[0] == ChatMessage("system", "You are terse.")
            assert job.stats.prompt_tokens + 40 <= 384
            # After a drop, the next turns keep their start: their cache is reused.
            assert notices[-1] == "" or notices[-2] == ""
    finally:
        server.stop(drain=0)


def test_overflow_can_be_refused_instead(tiny_model: Path) -> None:
    server = start_server(tiny_model, context_length=256, context_overflow="refuse")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            session_id = new_session(stub)
            long = "Tell me about the sea, the wind and the ships that sail on them. " * 3
            with pytest.raises(grpc.RpcError) as err:
                for _ in range(8):
                    say(stub, session_id, long, max_tokens=40)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no longer fits" in err.value.details()
            assert stub.GetSession(pb.GetSessionRequest(id=session_id)).session.message_count
    finally:
        server.stop(drain=0)


def test_kill_9_loses_no_acknowledged_turn(tiny_model: Path) -> None:
    state = tempfile.mkdtemp(prefix="edge-llm-state-")
    server = ServeProcess(tiny_model, env={"EDGE_LLM_STATE_DIR": state})
    try:
        server.wait_until_serving()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            session_id = new_session(stub)
            answers = [say(stub, session_id, q)[0] for q in QUESTIONS[:2]]
            # A third answer is streaming, not finished, when the process dies.
            request = pb.GenerateRequest(session_id=session_id, max_tokens=400, ignore_eos=True)
            request.messages.add(role="user", content="Count to a thousand.")
            call = stub.Generate(request)
            next(call)
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait(10)
    finally:
        server.kill()

    restarted = ServeProcess(tiny_model, env={"EDGE_LLM_STATE_DIR": state})
    try:
        restarted.wait_until_serving()
        with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as ch:
            stub = pb_grpc.EdgeLLMStub(ch)
            assert history(stub, session_id) == [
                ("user", QUESTIONS[0]),
                ("assistant", answers[0]),
                ("user", QUESTIONS[1]),
                ("assistant", answers[1]),
            ]
            say(stub, session_id, QUESTIONS[2])  # and the conversation goes on
            assert len(history(stub, session_id)) == 6
    finally:
        restarted.proc.terminate()
        restarted.wait(30)


def test_store_retention(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "s.sqlite3", max_sessions=3, idle_expiry_seconds=0)
    ids = [store.create("", SamplingDefaults())[0].id for _ in range(3)]
    store.commit_turn(ids[0], ChatMessage("user", "u"), ChatMessage("assistant", "a"))
    _, removed = store.create("", SamplingDefaults(), keep={ids[1]})  # ids[1] is answering
    assert removed == [ids[2]]  # the least recently used one not answering
    _, removed = store.create("", SamplingDefaults())
    assert removed == [ids[1]]
    with pytest.raises(NotFoundError):
        store.get(ids[1])
    assert store.expire(keep=set(ids)) == []


def test_sessions_are_their_owners(tmp_path: Path) -> None:
    """Another owner's session is not found, however it is asked for; a list shows one's own;
    one owner's surplus removes its own least recently used, never another's."""
    store = SessionStore(tmp_path / "s.sqlite3", 4, 0, max_per_owner=2)
    theirs = store.create("", SamplingDefaults(), owner="terminal")[0].id
    mine = [store.create("", SamplingDefaults(), owner="kiosk")[0].id for _ in range(2)]
    assert store.get(theirs, "terminal").id == theirs and store.owns(theirs, "terminal")
    with pytest.raises(NotFoundError):
        store.get(theirs, "kiosk")
    with pytest.raises(NotFoundError):
        store.update(theirs, SessionChanges(title="mine now"), "kiosk")
    with pytest.raises(NotFoundError):
        store.delete(theirs, "kiosk")
    assert not store.owns(theirs, "kiosk") and not store.owns(theirs, "")
    assert {s.id for s in store.list(10, "", "kiosk")[0]} == set(mine)
    assert [s.id for s in store.list(10, "", "terminal")[0]] == [theirs]
    assert len(store.list(10, "")[0]) == 3  # the server's own view
    _, removed = store.create("", SamplingDefaults(), owner="kiosk")
    assert removed == [mine[0]]  # its own oldest, not the terminal's (older still)
    _, removed = store.create("", SamplingDefaults(), keep={mine[1]}, owner="kiosk")
    assert len(removed) == 1 and removed[0] not in (theirs, mine[1])  # answering: kept
    assert store.get(theirs, "terminal").title == ""


def test_when_all_together_are_too_many_the_biggest_owner_gives_way(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "s.sqlite3", 4, 0, max_per_owner=3)
    small = store.create("", SamplingDefaults(), owner="terminal")[0].id  # the oldest of all
    big = [store.create("", SamplingDefaults(), owner="kiosk")[0].id for _ in range(3)]
    _, removed = store.create("", SamplingDefaults(), owner="terminal")
    assert removed == [big[0]]  # the kiosk's least recently used, not the older terminal's
    assert store.owns(small, "terminal")


def test_a_store_from_before_owners_opens_with_its_sessions_nobodys(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)  # the schema before owners
    db.execute(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, system_prompt TEXT NOT NULL, defaults TEXT "
        "NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, dropped_messages INTEGER "
        "NOT NULL DEFAULT 0, title TEXT NOT NULL DEFAULT '')"
    )
    kept = "0" * 32
    db.execute("INSERT INTO sessions VALUES (?, '', '{}', 1, 1, 0, '')", (kept,))
    db.commit()
    db.close()
    reopened = SessionStore(path, 10, 0)
    assert reopened.get(kept, "").id == kept  # seen without tokens, as before
    with pytest.raises(NotFoundError):
        reopened.get(kept, "kiosk")


def test_idle_sessions_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import FakeClock

    from edge_llm import sessions

    clock = FakeClock()
    monkeypatch.setattr(sessions, "time", clock)
    idle = SessionStore(tmp_path / "i.sqlite3", max_sessions=10, idle_expiry_seconds=3600)
    session, _ = idle.create("", SamplingDefaults())
    clock.advance(3599)
    assert idle.get(session.id).id == session.id
    clock.advance(2)
    with pytest.raises(NotFoundError):
        idle.get(session.id)
    assert idle.expire() == [session.id]


def test_a_clock_jump_that_cannot_be_written_is_tried_again(tmp_path, monkeypatch) -> None:
    from helpers import FakeClock

    from edge_llm import sessions

    clock = FakeClock()
    monkeypatch.setattr(sessions, "time", clock)
    store = SessionStore(tmp_path / "s.sqlite3", 10, 3600)
    young, _ = store.create("", SamplingDefaults())
    real, failures = store._db, []

    class FailingOnce:  # the first shift fails, as on a full disk
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def execute(self, sql: str, *args: object) -> object:
            if sql.startswith("UPDATE sessions SET updated_at") and not failures:
                failures.append(sql)
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    store._db = FailingOnce()  # type: ignore[assignment]
    clock.advance(60)
    clock.wall += 5 * 86400
    assert store.get(young.id).id == young.id  # the old time is used meanwhile
    assert failures
    assert store.expire() == []  # shifted now
    assert store.get(young.id).updated_at == pytest.approx(clock.wall - 60, abs=1)


def test_a_clock_behind_the_stored_times_expires_nothing(tmp_path, monkeypatch) -> None:
    """A board without a battery-backed clock boots in 1970 (or at its last shutdown): the
    sessions of the last run are not thrown away, nor kept forever."""
    from helpers import FakeClock

    from edge_llm import sessions

    clock = FakeClock()
    monkeypatch.setattr(sessions, "time", clock)
    path = tmp_path / "s.sqlite3"
    before, _ = SessionStore(path, 10, 3600).create("", SamplingDefaults())
    clock.wall = 0.0  # the next boot, clock not set yet
    store = SessionStore(path, 10, 3600)
    clock.advance(3000)
    assert store.expire() == []
    new, _ = store.create("", SamplingDefaults())
    assert new.updated_at > before.updated_at + 2999  # time goes on from the newest stored
    clock.advance(700)
    assert store.expire() == [before.id]  # an hour after the last run's last use


def test_a_clock_set_forward_keeps_this_runs_sessions_young(tmp_path, monkeypatch) -> None:
    """NTP sets the clock forward by days after such a boot: sessions used since start-up keep
    their age; older ones are as old as the new clock says."""
    from helpers import FakeClock

    from edge_llm import sessions

    clock = FakeClock()
    monkeypatch.setattr(sessions, "time", clock)
    path = tmp_path / "s.sqlite3"
    old, _ = SessionStore(path, 10, 3600).create("", SamplingDefaults())
    clock.advance(600)  # restarted 10 minutes later, clock right
    store = SessionStore(path, 10, 3600)
    clock.wall -= 5 * 86400  # ...or rather: it boots 5 days behind,
    young, _ = store.create("", SamplingDefaults())
    clock.advance(60)
    clock.wall += 5 * 86400  # and NTP puts it right a minute later
    assert store.get(young.id).updated_at == pytest.approx(clock.wall - 60, abs=1)
    assert store.expire() == []  # nothing is 5 days old
    clock.advance(3000)
    assert store.expire() == [old.id]
    clock.wall -= 86400  # set back: times never go backwards
    later, _ = store.create("", SamplingDefaults())
    assert later.updated_at > store.get(young.id).updated_at


def test_sessions_through_grpcurl(server) -> None:
    def call(method: str, body: dict) -> str:
        result = subprocess.run(
            [
                grpcurl(),
                "-plaintext",
                "-d",
                json.dumps(body),
                f"127.0.0.1:{server.port}",
                f"edge_llm.v1.EdgeLLM/{method}",
            ],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    defaults = {"temperature": 0, "max_tokens": 8}
    created = json.loads(
        call("CreateSession", {"system_prompt": "Be terse.", "defaults": defaults})
    )
    session_id = created["session"]["id"]
    out = call(
        "Generate", {"session_id": session_id, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert "FINISH_REASON" in out
    shown = json.loads(call("GetSession", {"id": session_id}))
    assert [m["role"] for m in shown["session"]["messages"]] == ["user", "assistant"]


def test_a_slow_commit_does_not_freeze_other_calls(tiny_model: Path) -> None:
    """A turn's commit (an fsync; seconds on a slow SD card) holds the sessions lock. A cancel
    arriving then used to wait for it on grpc's polling thread, and every other call froze."""
    import threading

    srv = start_server(tiny_model)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
            stub = pb_grpc.EdgeLLMStub(channel)
            loaded = srv.core.loaded
            store = loaded.conversations.store
            committing, go = threading.Event(), threading.Event()
            commit = store.commit_turn

            def slow_commit(*args: object) -> None:
                committing.set()
                go.wait(60)
                commit(*args)

            store.commit_turn = slow_commit  # type: ignore[method-assign]
            a, b = new_session(stub), new_session(stub)
            # a runs first; its turn is stored only once b has its claim (a claim needs the
            # lock the commit holds) and waits in the queue.
            submitted = {a: threading.Event(), b: threading.Event()}
            b_submitted = submitted[b]
            submit, finish = loaded.scheduler.submit, loaded.conversations.finish

            def watch_submit(job: Job) -> None:
                submit(job)
                submitted[job.request.session_id or ""].set()

            def finish_after_b(turn, *args):  # type: ignore[no-untyped-def]
                if turn.claim.session.id == a:
                    b_submitted.wait(60)
                return finish(turn, *args)

            loaded.scheduler.submit = watch_submit  # type: ignore[method-assign]
            loaded.conversations.finish = finish_after_b  # type: ignore[method-assign]
            answered: list[str] = []
            first = threading.Thread(target=lambda: answered.append(say(stub, a, "Hi")[0]))
            first.start()
            assert submitted[a].wait(60)
            request = pb.GenerateRequest(session_id=b, max_tokens=500, ignore_eos=True)
            request.messages.add(role="user", content="Tell me a long story.")
            second = stub.Generate(request, timeout=HANG_GUARD)
            assert committing.wait(60)  # a's turn is being committed, holding the lock
            next(second)  # b runs in the engine
            job = next(j for j in loaded.scheduler.running if j.request.session_id == b)
            b_free = freed(loaded.conversations, b)
            second.cancel()
            assert job is not None and job.cancelled.wait(10)  # b's RPC-done callback runs
            # Another call goes through while the commit still holds the lock.
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
            assert info.model.name
            go.set()
            first.join(60)
            assert answered and answered[0]
            assert history(stub, a)[-2:] == [("user", "Hi"), ("assistant", answered[0])]
            # b is freed once the commit is done, on a thread of its own (not grpc's poller).
            assert b_free.wait(60)
            say(stub, b, "Hello again")
    finally:
        srv.stop(drain=0)


def test_update_session_and_replace_last_over_grpc(stub: pb_grpc.EdgeLLMStub) -> None:
    made = stub.CreateSession(pb.CreateSessionRequest(title="Tides")).session
    assert made.title == "Tides"
    renamed = stub.UpdateSession(
        pb.UpdateSessionRequest(id=made.id, title="Harbours", system_prompt="Be brief.")
    ).session
    assert (renamed.title, renamed.system_prompt) == ("Harbours", "Be brief.")
    kept = stub.UpdateSession(pb.UpdateSessionRequest(id=made.id)).session  # nothing set
    assert (kept.title, kept.system_prompt) == ("Harbours", "Be brief.")

    def turn(content: str, replace_last: bool = False) -> str:
        request = pb.GenerateRequest(
            session_id=made.id, max_tokens=4, temperature=0, replace_last=replace_last
        )
        request.messages.add(role="user", content=content)
        return "".join(m.text for m in stub.Generate(request))

    first = turn("One.")
    turn("Two.")
    again = turn("Two, again.", replace_last=True)
    got = stub.GetSession(pb.GetSessionRequest(id=made.id)).session
    assert [(m.role, m.content) for m in got.messages] == [
        ("user", "One."),
        ("assistant", first),
        ("user", "Two, again."),
        ("assistant", again),
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateSession(pb.UpdateSessionRequest(id="0" * 32, title="x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
