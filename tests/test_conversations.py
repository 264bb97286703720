"""Fast checks of the session bookkeeping with stand-ins for the model: how a conversation is
fitted into the context, and how saved KV caches move between memory, disk and oblivion.
The real engine and server are tested in test_sessions.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_llm.conversations import Claim, Conversations
from edge_llm.kvstates import KVStates
from edge_llm.sessions import SessionStore
from edge_llm.types import (
    ChatMessage,
    GenerateRequest,
    RequestError,
    Sampling,
    SamplingDefaults,
    Session,
)

CONTEXT = 100


def words(_: None, messages: Sequence[ChatMessage]) -> list[int]:
    """A tokenizer stand-in: one token per word, plus 2 per message for the template."""
    return [0] * sum(len(m.content.split()) + 2 for m in messages)


def conversations(tmp_path: Path, drop_oldest: bool = True) -> Conversations:
    store = SessionStore(tmp_path / "s.sqlite3", max_sessions=10, idle_expiry_seconds=0)
    return Conversations(store, CONTEXT, drop_oldest, words, True, lambda _: None)


def fit(conv: Conversations, system: str, turns: int, message: str, max_tokens: int = 20):
    history = tuple(
        ChatMessage(role, "eight words of earlier conversation in this session")
        for _ in range(turns)
        for role in ("user", "assistant")
    )
    session = Session("s" * 32, system, SamplingDefaults(), history, len(history), 0, 0.0, 0.0)
    request = GenerateRequest(None, (ChatMessage("user", message),), max_tokens, Sampling())
    return conv.fit(Claim(session, 1), request)


def test_a_conversation_that_fits_is_kept_whole(tmp_path: Path) -> None:
    turn = fit(conversations(tmp_path), "Be brief.", 3, "hello")
    assert turn.dropped == 0 and turn.notice == ""
    assert len(turn.request.messages) == 1 + 6 + 1
    assert len(turn.prompt) == 4 + 6 * 10 + 3


def test_overflow_drops_whole_turns_down_to_half_the_context(tmp_path: Path) -> None:
    turn = fit(conversations(tmp_path), "Be brief.", 8, "hello")  # 4 + 160 + 3 tokens
    assert turn.dropped % 2 == 0 and turn.dropped > 0
    assert len(turn.prompt) <= CONTEXT // 2
    assert len(turn.prompt) + 20 > CONTEXT // 2  # not one turn (20 tokens) more than needed
    assert turn.request.messages[0] == ChatMessage("system", "Be brief.")
    assert f"its {turn.dropped} oldest messages were dropped" in turn.notice


def test_a_long_system_prompt_costs_only_what_must_go(tmp_path: Path) -> None:
    # The system prompt and the message alone take more than half: drop only what must go.
    turn = fit(conversations(tmp_path), "word " * 55, 4, "hello")  # 57 + 80 + 3 tokens
    # 100 - 20 of room = 80 for the prompt; system and message take 60: one turn stays.
    assert turn.dropped == 6
    assert len(turn.prompt) + 20 <= CONTEXT


def test_refusals_name_the_cause(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="start a new session"):
        fit(conversations(tmp_path, drop_oldest=False), "Be brief.", 8, "hello")
    with pytest.raises(RequestError, match="shorten the message"):
        fit(conversations(tmp_path), "Be brief.", 0, "word " * 90)


class FakeEngine:
    kv_restorable = True

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.loaded: list[list[int]] = []

    def kv_tokens(self) -> list[int]:
        return list(self.tokens)

    def save_kv(self) -> bytearray:
        return bytearray(b"k" * 100)

    def load_kv(self, tokens: list[int], data: bytearray) -> bool:
        self.tokens = tokens
        self.loaded.append(tokens)
        return True


def test_saved_caches_spill_to_disk_come_back_and_are_forgotten(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, tmp_path / "kv", memory_budget=150, disk_budget=10_000)
    for session, tokens in (("a", [1, 2]), ("b", [3]), ("c", [4])):
        kv.activate(session)
        engine.tokens = tokens
    # a and b were saved when the next took the engine; only one fits in memory.
    assert (tmp_path / "kv" / "a.kv").is_file() and kv.memory_bytes == 100
    kv.activate("a")
    assert engine.loaded[-1] == [1, 2] and not (tmp_path / "kv" / "a.kv").exists()

    kv.forget("b")  # deleted while a request of b's is still queued
    kv.activate("b")
    assert kv.owner is None and engine.loaded[-1] == [1, 2]  # nothing loaded for b
    assert not (tmp_path / "kv" / "b.kv").exists()
    kv.activate("c")
    assert engine.loaded[-1] == [4] and kv.memory_bytes == 100  # c back from disk, a kept


def test_idle_sessions_go_while_the_server_is_used(tmp_path: Path, monkeypatch) -> None:
    from helpers import FakeClock

    from edge_llm import conversations as module
    from edge_llm import sessions

    clock = FakeClock()
    monkeypatch.setattr(sessions, "time", clock)
    monkeypatch.setattr(module, "time", clock)
    store = SessionStore(tmp_path / "s.sqlite3", max_sessions=10, idle_expiry_seconds=3600)
    forgotten: list[str] = []
    conv = Conversations(store, CONTEXT, True, words, True, forgotten.append)
    idle = conv.create("", SamplingDefaults())
    busy = conv.create("", SamplingDefaults())
    answering = conv.claim(busy.id)  # answering: never removed
    clock.advance(3000)
    fresh = conv.create("", SamplingDefaults())  # nothing idle long enough yet
    assert forgotten == []
    clock.advance(700)  # idle: 3700 s; fresh: 700 s
    monkeypatch.setattr(module, "EXPIRE_EVERY", 0.0)
    conv.release(conv.claim(fresh.id))  # a turn starting checks for idle sessions
    assert forgotten == [idle.id]
    conv.release(answering)


def test_spilled_caches_stay_within_the_disk_budget(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, tmp_path / "kv", memory_budget=0, disk_budget=250)  # 2 files of 116
    for i, session_id in enumerate("abcd"):
        kv.activate(session_id)
        engine.tokens = [i]
    kv.activate(None)  # d's cache goes to disk too; a and b made room for c and d
    assert sorted(p.stem for p in (tmp_path / "kv").glob("*.kv")) == ["c", "d"]
    assert kv.disk_bytes == 2 * 116
    kv.activate("a")  # its cache was deleted: its history is processed instead
    assert engine.loaded == []
    kv.activate("c")  # c back from disk (its file gone); a's cache, just saved, goes there
    assert engine.loaded == [[2]]
    assert sorted(p.stem for p in (tmp_path / "kv").glob("*.kv")) == ["a", "d"]
    assert kv.free_disk() == 2 * 116
    assert list((tmp_path / "kv").glob("*.kv")) == [] and kv.disk_bytes == 0


def test_after_a_full_disk_caches_do_not_refill_the_space_freed(tmp_path, monkeypatch) -> None:
    import shutil

    from edge_llm import kvstates

    engine = FakeEngine()
    kv = KVStates(engine, tmp_path / "kv", memory_budget=0, disk_budget=10_000)
    kv.activate("a")
    kv.activate("b")  # a's cache on disk
    assert kv.disk_bytes == 112
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(kvstates.shutil, "disk_usage", lambda _: usage._replace(free=400))
    kv.free_disk()
    assert kv.disk_budget == 100  # a quarter of what is free now
    kv.activate("c")  # b's cache (112 bytes) no longer fits: not written
    assert kv.disk_bytes == 0 and list((tmp_path / "kv").glob("*.kv")) == []
    for n in range(3000):
        kv.forget(f"gone-{n}")
    assert len(kv._forgotten) <= 1024  # bounded


def test_a_full_disk_gives_up_the_caches_not_the_turn(tmp_path: Path) -> None:
    """SQLITE_FULL (here from max_page_count; on a board, a full SD card): the saved KV caches
    are deleted and the turn stored; if nothing can be freed, a clear error, not INTERNAL."""
    from edge_llm.types import StorageFullError

    freed: list[int] = []

    def make_room() -> int:
        freed.append(1)
        store._db.execute("PRAGMA max_page_count = 1000000")  # the space the caches held
        return 5 * 2**20

    store = SessionStore(tmp_path / "s.sqlite3", 10, 0, make_room=make_room)
    session, _ = store.create("", SamplingDefaults())
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    long = ChatMessage("assistant", "word " * 20_000)
    store.commit_turn(session.id, ChatMessage("user", "hi"), long)
    assert freed == [1] and store.get(session.id).messages[-1] == long

    stuck = SessionStore(tmp_path / "t.sqlite3", 10, 0)  # nothing to free
    other, _ = stuck.create("", SamplingDefaults())
    (pages,) = stuck._db.execute("PRAGMA page_count").fetchone()
    stuck._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageFullError, match="is full: this turn was not kept"):
        stuck.commit_turn(other.id, ChatMessage("user", "hi"), long)
