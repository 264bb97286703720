"""Sessions on disk: SQLite in WAL mode under the state directory.

A turn (the user's message and the answer) is written in one transaction and synced before
the answer's last message goes to the client, so an acknowledged turn survives a crash, a
`kill -9` or a power cut. A cancelled answer is not stored, nor is its user message.

One connection, used under a lock: sessions change a few times a minute, not thousands.

Idle expiry compares stored wall-clock times, and a board without a battery-backed clock boots
with a wrong one: the store's clock never runs behind the newest stored time or itself, and when
the system clock is set forward (NTP after such a boot), the times written since start-up move
with it, so a session used a minute ago stays a minute old.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_llm.types import (
    ChatMessage,
    NotFoundError,
    RequestError,
    SamplingDefaults,
    Session,
    SessionChanges,
    StorageFullError,
)

log = logging.getLogger(__name__)

CLOCK_JUMP = 300.0  # seconds the wall clock may gain on the monotonic one before it was "set"
TITLE_CHARS = 60  # a title taken from the first question is cut to this

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    system_prompt TEXT NOT NULL,
    defaults TEXT NOT NULL,                 -- JSON of SamplingDefaults
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    dropped_messages INTEGER NOT NULL DEFAULT 0,
    title TEXT NOT NULL DEFAULT '',         -- given, or the start of the first question
    owner TEXT NOT NULL DEFAULT ''          -- who made it (a token's name); '': no tokens
);
CREATE INDEX IF NOT EXISTS sessions_by_use ON sessions (updated_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,                   -- 0, 1, ... in the order of the conversation
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
"""


def state_directory(configured: str) -> Path:
    """Where sessions live: the configured directory, systemd's StateDirectory=, or the XDG
    state directory (~/.local/state/edge-llm)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edge-llm"


def usable_state_directory(configured: str) -> Path:
    """state_directory(), made if need be; an OSError that names it and the setting that moves
    it when it cannot be written (a read-only root in a container, no home directory)."""
    path = state_directory(configured)
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = "" if os.access(path, os.W_OK) else "not writable"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem:
        raise OSError(
            f"cannot keep sessions in {path} ({problem}): set state_dir in the config file, or "
            "EDGE_LLM_STATE_DIR, to a writable directory"
        )
    return path


class SessionStore:
    def __init__(
        self,
        path: Path,
        max_sessions: int,
        idle_expiry_seconds: float,
        make_room: Callable[[], int] = lambda: 0,
        max_per_owner: int = 0,
    ) -> None:
        """`make_room` frees disk space when it is full (the spilled KV caches); the bytes.
        `max_per_owner`: sessions one named owner may keep (0: no such limit); its least
        recently used make room for its next, never another owner's."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._make_room = make_room
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner
        self.idle_expiry_seconds = idle_expiry_seconds
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")  # a turn is on disk once commit returns
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "title" not in columns:  # a store made before titles
            self._db.execute("ALTER TABLE sessions ADD COLUMN title TEXT NOT NULL DEFAULT ''")
        if "owner" not in columns:  # before owners: nobody's (seen only without tokens)
            self._db.execute("ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions (owner, updated_at DESC, id)"
        )
        (newest,) = self._db.execute("SELECT max(updated_at) FROM sessions").fetchone()
        self._clock = _Clock(newest or 0.0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(
        self,
        system_prompt: str,
        defaults: SamplingDefaults,
        keep: Collection[str] = (),
        title: str = "",
        owner: str = "",
    ) -> tuple[Session, list[str]]:
        """A new session of `owner`'s; also the ids of the sessions removed to make room or
        idle too long (never those in `keep`: they are answering)."""
        session_id = uuid.uuid4().hex
        with self._lock:
            now = self._now()
            with self._transaction():
                removed = self._expire(now, room_for=1, keep=keep, owner=owner)
                self._db.execute(
                    "INSERT INTO sessions (id, system_prompt, defaults, created_at, updated_at, "
                    "title, owner) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        session_id,
                        system_prompt,
                        json.dumps(asdict(defaults)),
                        now,
                        now,
                        title,
                        owner,
                    ),
                )
        session = Session(session_id, system_prompt, defaults, (), 0, 0, now, now, title)
        return session, removed

    def update(self, session_id: str, changes: SessionChanges, owner: str | None = None) -> Session:
        """Change what was given; the session is not counted as used. With `owner`, only one
        of its sessions (another's is NotFoundError, as a missing one: ids are not shown)."""
        given = {"title": changes.title, "system_prompt": changes.system_prompt}
        values: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if changes.defaults is not None:
            values["defaults"] = json.dumps(asdict(changes.defaults))
        if values:
            with self._lock, self._transaction():
                assignments = ", ".join(f"{name} = ?" for name in values)
                mine, args = _owned(owner)
                updated = self._db.execute(
                    f"UPDATE sessions SET {assignments} WHERE id = ?{mine}",
                    (*values.values(), session_id, *args),
                )
                if not updated.rowcount:
                    raise NotFoundError(f"no session {session_id!r}")
        return self.get(session_id, owner)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """A session with its messages; with `owner`, only one of its own."""
        mine, args = _owned(owner)
        with self._lock:
            now = self._now()
            row = self._db.execute(
                "SELECT id, system_prompt, defaults, created_at, updated_at, dropped_messages, "
                f"title FROM sessions WHERE id = ?{mine}",
                (session_id, *args),
            ).fetchone()
            if row is None or self._idle(row[4], now):
                raise NotFoundError(f"no session {session_id!r}; create one with CreateSession")
            messages = tuple(
                ChatMessage(role, content)
                for role, content in self._db.execute(
                    "SELECT role, content FROM messages WHERE session_id = ? ORDER BY seq",
                    (session_id,),
                )
            )
        return _session(row, messages, len(messages))

    def list(
        self, page_size: int, page_token: str, owner: str | None = None
    ) -> tuple[list[Session], str]:
        """Most recently used first (with `owner`, its own only); the token for the next
        page, or "" after the last."""
        conditions: builtins.list[str] = ["1"]
        args: builtins.list[Any] = []
        if owner is not None:
            conditions.append("s.owner = ?")
            args.append(owner)
        if page_token:
            updated_at, after_id = _decode_token(page_token)
            conditions.append("(s.updated_at, s.id) < (?, ?)")
            args += [updated_at, after_id]
        with self._lock:
            if self.idle_expiry_seconds:
                conditions.append("s.updated_at >= ?")
                args.append(self._now() - self.idle_expiry_seconds)
            where = "WHERE " + " AND ".join(conditions)
            rows = self._db.execute(
                "SELECT s.id, s.system_prompt, s.defaults, s.created_at, s.updated_at, "
                "s.dropped_messages, s.title, "
                "(SELECT count(*) FROM messages m WHERE m.session_id = s.id) "
                f"FROM sessions s {where} ORDER BY s.updated_at DESC, s.id DESC LIMIT ?",
                (*args, page_size + 1),
            ).fetchall()
        sessions = [_session(row[:7], (), row[7]) for row in rows[:page_size]]
        more = len(rows) > page_size
        token = _encode_token(sessions[-1].updated_at, sessions[-1].id) if more else ""
        return sessions, token

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM sessions").fetchone()
        return int(n)

    def delete(self, session_id: str, owner: str | None = None) -> None:
        mine, args = _owned(owner)
        with self._lock, self._transaction():
            deleted = self._db.execute(
                f"DELETE FROM sessions WHERE id = ?{mine}", (session_id, *args)
            )
            if not deleted.rowcount:
                raise NotFoundError(f"no session {session_id!r}")

    def owns(self, session_id: str, owner: str) -> bool:
        """The session exists and is `owner`'s."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM sessions WHERE id = ? AND owner = ?", (session_id, owner)
            ).fetchone()
        return row is not None

    def commit_turn(
        self,
        session_id: str,
        user: ChatMessage,
        answer: ChatMessage,
        drop: int = 0,
        replace_last: bool = False,
    ) -> None:
        """Store a finished turn, after dropping the `drop` oldest messages (and, to replace
        it, the last turn): all or nothing. On a full disk, make_room() first (caches are
        worth less than a turn), then again."""
        turn = _Turn(user, answer, drop, replace_last)
        try:
            self._commit_turn(session_id, turn)
            return
        except sqlite3.OperationalError as e:
            if "full" not in str(e):  # SQLITE_FULL: "database or disk is full"
                raise
        if freed := self._make_room():
            log.warning(
                "the disk is full: %.1f MiB of saved KV caches deleted to store a turn",
                freed / 2**20,
            )
            try:
                self._commit_turn(session_id, turn)
                return
            except sqlite3.OperationalError as e:
                if "full" not in str(e):
                    raise
        raise StorageFullError(
            f"the disk holding the sessions ({self.path.parent}) is full: this turn was not "
            "kept; free some space there, or delete old sessions"
        )

    def _commit_turn(self, session_id: str, turn: _Turn) -> None:
        with self._lock:
            now = self._now()
            self._store_turn(now, session_id, turn)

    def _store_turn(self, now: float, session_id: str, turn: _Turn) -> None:
        user, answer, drop = turn.user, turn.answer, turn.drop
        with self._transaction():
            exists = self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,))
            if exists.fetchone() is None:
                raise NotFoundError(f"session {session_id} was deleted during the answer")
            if turn.replace_last:  # the last user message and its answer
                self._db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND seq >= (SELECT max(seq) - 1 "
                    "FROM messages WHERE session_id = ?)",
                    (session_id, session_id),
                )
            if drop:
                self._db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND seq IN (SELECT seq FROM "
                    "messages WHERE session_id = ? ORDER BY seq LIMIT ?)",
                    (session_id, session_id, drop),
                )
            (last,) = self._db.execute(
                "SELECT coalesce(max(seq), -1) FROM messages WHERE session_id = ?", (session_id,)
            ).fetchone()
            self._db.executemany(
                "INSERT INTO messages (session_id, seq, role, content, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (session_id, last + 1, user.role, user.content, now),
                    (session_id, last + 2, answer.role, answer.content, now),
                ],
            )
            self._db.execute(
                "UPDATE sessions SET updated_at = ?, dropped_messages = dropped_messages + ?, "
                "title = CASE title WHEN '' THEN ? ELSE title END WHERE id = ?",
                (now, drop, _title(user.content), session_id),
            )

    def expire(self, keep: Collection[str] = ()) -> builtins.list[str]:
        """Remove idle and surplus sessions now, except those in `keep`; their ids."""
        with self._lock:
            now = self._now()
            with self._transaction():
                return self._expire(now, room_for=0, keep=keep)

    def _expire(
        self, now: float, room_for: int, keep: Collection[str], owner: str = ""
    ) -> builtins.list[str]:
        ids = []
        if self.idle_expiry_seconds:
            ids += [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM sessions WHERE updated_at < ?",
                    (now - self.idle_expiry_seconds,),
                )
                if r[0] not in keep
            ]
        # Each step's sessions go at once, so the next counts without naming them (idle ones
        # may be thousands).
        self._remove(ids)
        if owner and self.max_per_owner:  # its own least recently used make room for it
            ids += self._remove(
                self._surplus("owner = ?", [owner], room_for - self.max_per_owner, keep)
            )
        # All together too many: the least recently used of the owner with the most.
        ids += self._remove(self._surplus("1", [], room_for - self.max_sessions, keep))
        if ids:
            log.info("removed %d idle or surplus sessions", len(ids))
        return ids

    def _remove(self, ids: builtins.list[str]) -> builtins.list[str]:
        self._db.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in ids])
        return ids

    def _surplus(
        self, where: str, args: builtins.list[Any], over: int, keep: Collection[str]
    ) -> builtins.list[str]:
        """The count + `over` (room wanted, less the limit) sessions that must go of those
        `where` selects, never one in `keep` (answering now): the least recently used of the
        owner with the most."""
        (count,) = self._db.execute(f"SELECT count(*) FROM sessions WHERE {where}", args).fetchone()
        surplus = count + over
        if surplus <= 0:
            return []
        skip = builtins.list(keep)
        marks = ",".join("?" * len(skip))
        return [
            r[0]
            for r in self._db.execute(
                f"SELECT id FROM sessions s WHERE {where} AND id NOT IN ({marks}) ORDER BY "
                "(SELECT count(*) FROM sessions o WHERE o.owner = s.owner) DESC, updated_at, id "
                "LIMIT ?",
                (*args, *skip, surplus),
            )
        ]

    def _idle(self, updated_at: float, now: float) -> bool:
        idle = self.idle_expiry_seconds
        return bool(idle) and updated_at < now - idle

    def _now(self) -> float:
        """The store's time, read under the lock before any transaction: a clock set forward
        carries this run's times with it first, in a transaction of its own (if that cannot
        be written, the time before the jump is used, and the next call tries again)."""
        reading = self._clock.read()
        if reading.jump:
            started = self._clock.started
            try:
                with self._transaction():
                    self._db.execute(
                        "UPDATE sessions SET updated_at = updated_at + ?1, created_at = "
                        "created_at + (CASE WHEN created_at >= ?2 THEN ?1 ELSE 0 END) "
                        "WHERE updated_at >= ?2",
                        (reading.jump, started),
                    )
                    self._db.execute(
                        "UPDATE messages SET created_at = created_at + ?1 WHERE created_at >= ?2",
                        (reading.jump, started),
                    )
            except sqlite3.Error as e:
                log.warning(
                    "the system clock was set forward by %.0f s, and the sessions' "
                    "times could not follow yet (%s)",
                    reading.jump,
                    e,
                )
                return reading.now - reading.jump
            log.warning(
                "the system clock was set forward by %.0f s: the sessions used since "
                "start-up keep their age",
                reading.jump,
            )
        self._clock.advance(reading)
        return reading.now

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (disk I/O error)
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


class _Clock:
    """Wall-clock time that never goes back: not behind `floor` (the newest time stored) nor
    behind itself; a reading also says how far the system clock was set forward, if it was."""

    def __init__(self, floor: float) -> None:
        wall = time.time()
        if wall < floor:
            log.warning(
                "the system clock is behind the newest session time by %.0f s (not set "
                "yet?): session times go on from there",
                floor - wall,
            )
        self._now = max(wall, floor + 0.001)  # this run's times are all above the old ones
        self._mono = time.monotonic()
        self.started = self._now

    def read(self) -> _Reading:
        """The time now, and how far the system clock was set forward since the last
        advance(); nothing changes until advance()."""
        wall, mono = time.time(), time.monotonic()
        expected = self._now + (mono - self._mono)
        jump = wall - expected if wall - expected > CLOCK_JUMP else 0.0
        return _Reading(max(wall, expected), mono, jump)

    def advance(self, reading: _Reading) -> None:
        self._now, self._mono = reading.now, reading.mono
        self.started += reading.jump


@dataclass(frozen=True)
class _Reading:
    now: float
    mono: float
    jump: float


@dataclass(frozen=True)
class _Turn:
    user: ChatMessage
    answer: ChatMessage
    drop: int
    replace_last: bool


def _title(question: str) -> str:
    """A title from a conversation's first question: its first line, cut at a word."""
    line = " ".join(question.split("\n", 1)[0].split())
    if len(line) <= TITLE_CHARS:
        return line
    return line[:TITLE_CHARS].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


def _owned(owner: str | None) -> tuple[str, tuple[str, ...]]:
    """The SQL condition (after a WHERE) and argument that keep a query to `owner`'s
    sessions; none for None (the server's own reads)."""
    return ("", ()) if owner is None else (" AND owner = ?", (owner,))


def _session(row: tuple[Any, ...], messages: tuple[ChatMessage, ...], count: int) -> Session:
    session_id, system_prompt, defaults, created_at, updated_at, dropped, title = row
    values = json.loads(defaults)
    values["stop"] = tuple(values.get("stop", ()))
    return Session(
        session_id,
        system_prompt,
        SamplingDefaults(**values),
        messages,
        count,
        dropped,
        created_at,
        updated_at,
        title,
    )


def _encode_token(updated_at: float, session_id: str) -> str:
    return base64.urlsafe_b64encode(f"{updated_at!r}/{session_id}".encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        updated_at, session_id = base64.urlsafe_b64decode(token.encode()).decode().split("/", 1)
        return float(updated_at), session_id
    except ValueError:
        raise RequestError("page_token is not one this server gave out") from None
