"""The model's KV cache per session, so a conversation's next turn processes only what is new.

The engine has one context. When a request for another session (or none) takes it, the
current session's cache is saved first; when that session comes back, its cache is loaded
and the engine's prefix reuse finds everything but the new turn in it. Saved caches are kept
in memory up to a budget (part of the memory plan); the least recently used ones spill to
files under the state directory, up to a disk budget (beyond it, the least recently used
files go). A lost or refused cache costs time, never correctness: the engine then processes
the conversation from its history. So when the disk is full, the caches go first.

activate() runs on the engine's worker thread; forget() may come from any thread.
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
from array import array
from collections import OrderedDict, deque
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


_AUTO_DISK_MAX = 2 << 30  # the automatic disk budget's cap
_FORGOTTEN_KEPT = 1024  # deleted sessions remembered, for jobs of theirs still queued


class KVStates:
    def __init__(
        self, engine: KVEngine, directory: Path, memory_budget: int, disk_budget: int | None
    ) -> None:
        """`disk_budget` None: a quarter of the free space (once old caches are gone), <= 2 GiB."""
        self._engine = engine
        self._dir = directory
        self.memory_budget = memory_budget
        self._memory: OrderedDict[str, _Saved] = OrderedDict()  # least recently used first
        self._memory_bytes = 0
        self._disk: OrderedDict[str, int] = OrderedDict()  # spilled file sizes, oldest first
        self._disk_bytes = 0
        self.owner: str | None = None  # whose conversation the context holds
        # Deleted: a job of theirs still queued saves nothing. Bounded: the last ones suffice.
        self._forgotten: deque[str] = deque(maxlen=_FORGOTTEN_KEPT)
        self._lock = threading.Lock()
        # Caches from before a restart may come from another model or build: start clean.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        if disk_budget is None:
            disk_budget = min(shutil.disk_usage(directory).free // 4, _AUTO_DISK_MAX)
            log.info("session caches on disk: up to %d MiB in %s", disk_budget >> 20, directory)
        self.disk_budget = disk_budget

    def activate(self, session_id: str | None) -> None:
        """Make the context hold `session_id`'s cache (None: a request without a session,
        which reuses whatever prefix it shares with the context)."""
        with self._lock:
            self._activate(session_id)

    def _activate(self, session_id: str | None) -> None:
        if session_id == self.owner:
            return
        wanted = None if session_id in self._forgotten else session_id
        # Taken first: saving the context's owner may push other caches out of the budgets.
        saved = self._take(wanted) if wanted is not None else None
        if self.owner is not None and self._engine.kv_restorable:
            self._keep(self.owner, _Saved(self._engine.kv_tokens(), self._engine.save_kv()))
        self.owner = wanted
        if saved is not None and not self._engine.load_kv(saved.tokens, saved.data):
            log.warning(
                "session %s: its saved KV cache was refused; processing its history", session_id
            )

    def forget(self, session_id: str) -> None:
        """The session is gone: drop its cache wherever it is."""
        with self._lock:
            self._forgotten.append(session_id)
            if self.owner == session_id:
                self.owner = None
            saved = self._memory.pop(session_id, None)
            if saved is not None:
                self._memory_bytes -= len(saved.data)
            self._unlink(session_id)

    def free_disk(self) -> int:
        """The disk is full: delete every spilled cache, so that what matters can be written,
        and keep spilling to a quarter of what is free now (not into the space just freed);
        the bytes freed."""
        with self._lock:
            freed = self._disk_bytes
            for session_id in list(self._disk):
                self._unlink(session_id)
            self.disk_budget = min(self.disk_budget, shutil.disk_usage(self._dir).free // 4)
            log.warning(
                "the disk is full: session caches on disk now up to %d MiB", self.disk_budget >> 20
            )
            return freed

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes

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

    def _unlink(self, session_id: str) -> None:
        self._disk_bytes -= self._disk.pop(session_id, 0)
        self._file(session_id).unlink(missing_ok=True)

    def _spill(self, session_id: str, saved: _Saved) -> None:
        size = len(_MAGIC) + 4 + 4 * len(saved.tokens) + len(saved.data)
        if size > self.disk_budget:
            return  # it alone is over the budget: reprocessing it is the cheaper loss
        while self._disk_bytes + size > self.disk_budget:
            self._unlink(next(iter(self._disk)))  # the least recently spilled
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
            return
        self._disk[session_id] = size
        self._disk_bytes += size

    def _unspill(self, session_id: str) -> _Saved | None:
        if session_id not in self._disk:
            return None
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
        except (OSError, ValueError):
            return None
        finally:
            self._unlink(session_id)
        return _Saved(tokens.tolist(), data)
