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
    """The KV cache side of an engine: records what it is asked to do."""

    kv_restorable = True

    def __init__(self) -> None:
        self.loaded: list[int] = []  # sequences a saved cache went into
        self.copies: list[tuple[int, int, int]] = []

    def seq_drop(self, seq: int, start: int = 0) -> bool:
        return True

    def seq_copy(self, source: int, target: int, n: int) -> None:
        self.copies.append((source, target, n))

    def seq_save(self, seq: int) -> bytearray:
        return bytearray(b"k" * 100)

    def seq_load(self, seq: int, data: bytearray) -> bool:
        self.loaded.append(seq)
        return True


def turn(kv: KVStates, session_id: str | None, prompt: list[int]) -> int:
    """A request's life as the scheduler sees it; how many prompt tokens it found cached."""
    slot, reused = kv.acquire(session_id, prompt, len(prompt) + 4)
    slot.tokens.extend(prompt[reused:])  # what decoding puts in the cache
    kv.release(slot)
    return reused


def files(tmp_path: Path) -> list[str]:
    return sorted(p.stem for p in (tmp_path / "kv").glob("*.kv"))


def test_saved_caches_spill_to_disk_come_back_and_are_forgotten(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 1, 1000, tmp_path / "kv", memory_budget=150, disk_budget=10_000)
    for session, tokens in (("a", [1, 2]), ("b", [3]), ("c", [4])):
        turn(kv, session, tokens)
    # a and b were saved when the next took the one sequence; only one fits in memory.
    assert files(tmp_path) == ["a"] and kv.memory_bytes == 100
    assert turn(kv, "a", [1, 2, 5]) == 2 and engine.loaded == [0]
    assert files(tmp_path) == ["b"]  # c, saved as a came back, pushed b out of memory

    kv.forget("b")  # deleted while a request of b's is still queued
    assert turn(kv, "b", [3, 6]) == 0 and engine.loaded == [0]  # nothing loaded for b
    assert files(tmp_path) == ["c"]  # b's file is gone; a, saved as b came, pushed c out
    assert turn(kv, "c", [4, 7]) == 1 and kv.memory_bytes == 100  # c from disk, a kept


def test_a_cache_stays_in_its_sequence_only_while_nothing_else_runs(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 3, 1000, tmp_path / "kv", memory_budget=1000, disk_budget=10_000)
    turn(kv, "a", [1, 2, 3])
    assert turn(kv, "a", [1, 2, 3, 6]) == 3  # still in its sequence: nothing saved or loaded
    assert engine.loaded == [] and kv.memory_bytes == 0
    turn(kv, "b", [4, 5])  # another request runs: a's cache is saved and leaves the pool
    assert kv.memory_bytes == 100 and [s.owner for s in kv.slots if s.tokens] == ["b"]
    running, _ = kv.acquire("c", [7], 5)
    assert kv.memory_bytes == 200  # b's too, before c's first step
    turn(kv, None, [8, 9])  # ends while c runs: it leaves at once
    assert kv.memory_bytes == 300
    assert [s.owner for s in kv.slots if s.tokens or s.reserved] == ["c"]
    kv.release(running)
    assert turn(kv, "a", [1, 2, 3, 6, 7]) == 4 and engine.loaded  # a comes back
    assert kv.memory_bytes == 200  # taken from memory
    kv.forget("a")
    turn(kv, None, [7])  # the next request drops a's resident cache: it must not outlive a
    assert all(s.owner != "a" for s in kv.slots) and kv.memory_bytes == 200


def test_a_deleted_sessions_queued_request_leaves_no_cache(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 2, 1000, tmp_path / "kv", memory_budget=1000, disk_budget=10_000)
    turn(kv, "a", [1, 2])
    turn(kv, "b", [3])  # a's cache saved
    kv.forget("a")  # deleted while a request of a's is still queued
    running, _ = kv.acquire("c", [5], 5)
    assert turn(kv, "a", [1, 2, 4]) == 0  # ends while c runs: its cache is dropped, not saved
    kv.release(running)
    turn(kv, None, [1, 2, 4, 6])
    assert engine.loaded == [] and kv.memory_bytes == sum(
        len(saved.data) for saved in kv._memory.values()
    )
    assert all(saved.tokens[:2] != [1, 2] for saved in kv._memory.values())


def test_a_shared_prefix_is_copied_from_another_sequence(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 3, 1000, tmp_path / "kv", memory_budget=1000, disk_budget=10_000)
    system = [9, 9, 9, 9]
    turn(kv, "a", [*system, 1, 2])
    assert turn(kv, None, [*system, 3]) == 4  # a request without a session: the system prompt
    assert engine.copies == [(0, 1, 4)] and engine.loaded == []
    assert turn(kv, "b", [*system, 5]) == 4  # and a new session's first turn
    assert len(engine.copies) == 2


def test_a_shared_prefix_is_loaded_from_a_saved_cache(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 1, 1000, tmp_path / "kv", memory_budget=1000, disk_budget=10_000)
    system = [9, 9, 9, 9]
    turn(kv, "a", [*system, 1])
    turn(kv, None, [7])  # a's cache saved
    assert turn(kv, "b", [*system, 5]) == 4 and engine.loaded == [0]  # a copy of a's
    assert turn(kv, "a", [*system, 1, 8]) == 5  # a's own is still there
    # An earlier request without a session, sent again with more (an OpenAI client's next
    # turn), finds its cache; that cache is taken, not copied.
    turn(kv, None, [3, 4, 5])
    turn(kv, "c", [6])
    before = kv.memory_bytes
    assert turn(kv, None, [3, 4, 5, 6, 7]) == 3 and kv.memory_bytes == before


def test_idle_caches_give_way_when_a_request_needs_the_cells(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 3, 20, tmp_path / "kv", memory_budget=1000, disk_budget=10_000)
    turn(kv, "a", [1] * 8)  # 8 cells held after its turn
    assert kv.fits(12)  # held by an idle cache, not reserved: it gives way
    slot, _ = kv.acquire("c", [3] * 8, 12)
    assert kv.memory_bytes == 100  # a was saved before c's first step
    assert not kv.fits(10)  # 12 reserved + 10 > 20
    kv.release(slot)
    assert turn(kv, "a", [1] * 9) == 8 and engine.loaded  # a comes back


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
    answering = conv.claim(busy.id, "")  # answering: never removed
    clock.advance(3000)
    fresh = conv.create("", SamplingDefaults())  # nothing idle long enough yet
    assert forgotten == []
    clock.advance(700)  # idle: 3700 s; fresh: 700 s
    monkeypatch.setattr(module, "EXPIRE_EVERY", 0.0)
    conv.release(conv.claim(fresh.id, ""))  # a turn starting checks for idle sessions
    assert forgotten == [idle.id]
    conv.release(answering)


def test_spilled_caches_stay_within_the_disk_budget(tmp_path: Path) -> None:
    engine = FakeEngine()
    kv = KVStates(engine, 1, 1000, tmp_path / "kv", memory_budget=0, disk_budget=250)
    for i, session_id in enumerate("abcd"):  # files of 116 bytes: 2 fit
        turn(kv, session_id, [i])
    turn(kv, None, [9])  # d's cache goes to disk too; a and b made room for c and d
    assert files(tmp_path) == ["c", "d"]
    assert kv.disk_bytes == 2 * 116
    turn(kv, "a", [0, 1])  # its cache was deleted: its history is processed instead
    assert engine.loaded == []
    turn(kv, "c", [2, 1])  # c back from disk (its file gone); a's cache, just saved, goes there
    assert engine.loaded == [0]
    assert files(tmp_path) == ["a", "d"]
    assert kv.free_disk() == 120 + 116  # a now holds 2 tokens
    assert files(tmp_path) == [] and kv.disk_bytes == 0


def test_after_a_full_disk_caches_do_not_refill_the_space_freed(tmp_path, monkeypatch) -> None:
    import shutil

    from edge_llm import kvstates

    engine = FakeEngine()
    kv = KVStates(engine, 1, 1000, tmp_path / "kv", memory_budget=0, disk_budget=10_000)
    turn(kv, "a", [1, 2, 3])
    turn(kv, "b", [4, 5, 6])  # a's cache on disk
    assert kv.disk_bytes == 124
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(kvstates.shutil, "disk_usage", lambda _: usage._replace(free=400))
    kv.free_disk()
    assert kv.disk_budget == 100  # a quarter of what is free now
    turn(kv, "c", [7])  # b's cache (124 bytes) no longer fits: not written
    assert kv.disk_bytes == 0 and files(tmp_path) == []
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
