"""The model's KV cache per session, so a conversation's next turn processes only what is new.

The engine has one context. When a request for another session (or none) takes it, the
current session's cache is saved first; when that session comes back, its cache is loaded
and the engine's prefix reuse finds everything but the new turn in it. Saved caches are kept
in memory up to a budget (part of the memory plan); the least recently used ones spill to
files under the state directory. A lost or refused cache costs time, never correctness: the
engine then processes the conversation from its history.

activate() runs on the engine's worker thread; forget() may come from any thread.
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

_MAGIC = b"EDGEKV1\n"


class KVEngine(Protocol):
    def kv_tokens(self) -> list[int]: ...
    def save_kv(self) -> bytearray: ...
    def load_kv(self, tokens: list[int], data: bytearray) -> bool: ...
    @property
    def kv_restorable(self) -> bool: ...


@dataclass
class _Saved:
    tokens: list[int]
    data: bytearray


class KVStates:
    def __init__(self, engine: KVEngine, directory: Path, memory_budget: int) -> None:
        self._engine = engine
        self._dir = directory
        self.memory_budget = memory_budget
        self._memory: OrderedDict[str, _Saved] = OrderedDict()  # least recently used first
        self._memory_bytes = 0
        self.owner: str | None = None  # whose conversation the context holds
        self._forgotten: set[str] = set()  # deleted: a job of theirs still queued saves nothing
        self._lock = threading.Lock()
        # Caches from before a restart may come from another model or build: start clean.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)

    def activate(self, session_id: str | None) -> None:
        """Make the context hold `session_id`'s cache (None: a request without a session,
        which reuses whatever prefix it shares with the context)."""
        with self._lock:
            self._activate(session_id)

    def _activate(self, session_id: str | None) -> None:
        if session_id == self.owner:
            return
        if self.owner is not None and self._engine.kv_restorable:
            self._keep(self.owner, _Saved(self._engine.kv_tokens(), self._engine.save_kv()))
        self.owner = None if session_id in self._forgotten else session_id
        if self.owner is None:
            return
        saved = self._take(session_id)
        if saved is not None and not self._engine.load_kv(saved.tokens, saved.data):
            log.warning("session %s: its saved KV cache was refused; processing its history",
                        session_id)  # fmt: skip

    def forget(self, session_id: str) -> None:
        """The session is gone: drop its cache wherever it is."""
        with self._lock:
            self._forgotten.add(session_id)
            if self.owner == session_id:
                self.owner = None
            saved = self._memory.pop(session_id, None)
            if saved is not None:
                self._memory_bytes -= len(saved.data)
            self._file(session_id).unlink(missing_ok=True)

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def _keep(self, session_id: str, saved: _Saved) -> None:
        self._memory[session_id] = saved
        self._memory_bytes += len(saved.data)
        while self._memory_bytes > self.memory_budget and self._memory:
            victim, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old.data)
            self._spill(victim, old)

    def _take(self, session_id: str) -> _Saved | None:
        saved = self._memory.pop(session_id, None)
        if saved is not None:
            self._memory_bytes -= len(saved.data)
            return saved
        return self._unspill(session_id)

    def _file(self, session_id: str) -> Path:
        return self._dir / f"{session_id}.kv"

    def _spill(self, session_id: str, saved: _Saved) -> None:
        path, tmp = self._file(session_id), self._file(session_id).with_suffix(".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(_MAGIC + struct.pack("<I", len(saved.tokens)))
                f.write(array("i", saved.tokens).tobytes())
                f.write(saved.data)
            tmp.replace(path)
        except OSError as e:  # a full disk costs this session a reprocessing, nothing more
            log.warning("could not keep session %s's KV cache on disk (%s)", session_id, e)
            tmp.unlink(missing_ok=True)

    def _unspill(self, session_id: str) -> _Saved | None:
        path = self._file(session_id)
        try:
            with path.open("rb") as f:
                head = f.read(len(_MAGIC) + 4)
                if len(head) < len(_MAGIC) + 4 or head[: len(_MAGIC)] != _MAGIC:
                    return None
                (n,) = struct.unpack("<I", head[len(_MAGIC) :])
                tokens = array("i")
                tokens.frombytes(f.read(4 * n))
                data = bytearray(f.read())
        except (FileNotFoundError, ValueError):
            return None
        finally:
            path.unlink(missing_ok=True)
        return _Saved(tokens.tolist(), data)
