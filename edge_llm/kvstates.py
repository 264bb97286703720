"""The KV cache's sequences: which conversation each holds, and where the others' caches wait.

The engine's context has one pool of KV cells shared by a fixed number of sequences (slots).
A running request holds a slot and has reserved the cells it may fill (its prompt and its
longest answer), so running requests never run out of cells. An idle slot keeps its cache
resident: a session's next turn, or any request that shares a prefix with it (a system prompt),
starts from there, or copies that prefix into its own slot (cells are shared, not duplicated).
When a slot or cells are needed, the least recently used idle slot gives way: a session's cache
is saved first, in memory up to a budget (part of the memory plan), then spilled to files under
the state directory up to a disk budget (beyond it, the least recently used files go). A lost or
refused cache costs time, never correctness: the engine then processes the conversation from its
history. So when the disk is full, the caches go first.

acquire() and release() run on the engine's worker thread, the only one that touches the
engine; forget() and free_disk() may come from any thread and only change bookkeeping.
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

_MAGIC = b"EDGEKV1\n"


class KVEngine(Protocol):
    @property
    def kv_restorable(self) -> bool: ...
    def seq_drop(self, seq: int, start: int = 0) -> bool: ...
    def seq_copy(self, source: int, target: int, n: int) -> None: ...
    def seq_save(self, seq: int) -> bytearray: ...
    def seq_load(self, seq: int, data: bytearray) -> bool: ...


@dataclass(eq=False)
class Slot:
    """One sequence of the context."""

    seq: int
    tokens: list[int] = field(default_factory=list)  # in its cache, from position 0
    owner: str | None = None  # the session whose conversation it holds
    reserved: int = 0  # > 0: a running request may fill it up to this many cells
    used: int = 0  # when a request last took it (a counter), for least-recently-used


@dataclass
class _Saved:
    tokens: list[int]
    data: bytearray


_AUTO_DISK_MAX = 2 << 30  # the automatic disk budget's cap
_FORGOTTEN_KEPT = 1024  # deleted sessions remembered, for jobs of theirs still queued


class KVStates:
    def __init__(
        self,
        engine: KVEngine,
        sequences: int,
        pool: int,
        directory: Path,
        memory_budget: int,
        disk_budget: int | None,
    ) -> None:
        """`disk_budget` None: a quarter of the free space (once old caches are gone), <= 2 GiB."""
        self._engine = engine
        self.slots = [Slot(seq) for seq in range(sequences)]
        self.pool = pool  # cells shared by every slot
        self._clock = 0
        self._dir = directory
        self.memory_budget = memory_budget
        self._memory: OrderedDict[str, _Saved] = OrderedDict()  # least recently used first
        self._memory_bytes = 0
        self._disk: OrderedDict[str, int] = OrderedDict()  # spilled file sizes, oldest first
        self._disk_bytes = 0
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

    # -- the engine's worker ---------------------------------------------------------------

    def fits(self, cells: int) -> bool:
        """Whether a request that may fill `cells` cells can start now (idle slots give way)."""
        with self._lock:
            running = [s for s in self.slots if s.reserved]
            reserved = sum(s.reserved for s in running)
            return len(running) < len(self.slots) and reserved + cells <= self.pool

    def acquire(self, session_id: str | None, prompt: list[int], cells: int) -> tuple[Slot, int]:
        """A slot for a request that fits(): the session's own, or the one that saves the most
        work; its cache then holds the longest prefix of `prompt` on hand, and that length is
        returned (never the whole prompt: the last token's logits are what the answer starts
        from). None as `session_id`: a request without a session."""
        with self._lock:
            self._clock += 1
            for slot in self.slots:
                if not slot.reserved and slot.owner is not None and slot.owner in self._forgotten:
                    self._drop(slot)  # deleted since: its cache must not outlive it
            wanted = None if session_id in self._forgotten else session_id
            resident = self._resident(wanted)
            # Taken before a slot is freed: saving its cache may push others out of the budgets.
            saved = self._take(wanted) if wanted is not None and resident is None else None
            slot = resident or self._free_slot(wanted, prompt)
            slot.used, slot.reserved, slot.owner = self._clock, cells, wanted
            if saved is not None:
                slot.reserved = max(cells, len(saved.tokens))  # room to load it into
                self._make_room(slot)
                if self._engine.seq_load(slot.seq, saved.data):
                    slot.tokens = saved.tokens
                else:
                    log.warning(
                        "session %s: its saved KV cache was refused; processing its history",
                        session_id,
                    )
                slot.reserved = cells
            reused = self._reuse(slot, prompt)
            self._make_room(slot)
            return slot, reused

    def release(self, slot: Slot, intact: bool = True) -> None:
        """The request is over; its slot stays resident. `intact` False: the request failed in
        the engine and what the cache holds is unknown, so it is dropped."""
        with self._lock:
            slot.reserved = 0
            if not intact or slot.owner in self._forgotten:
                self._drop(slot)

    def clear(self) -> None:
        """Drop every cache; only while nothing runs (after the warm-up, so that the first
        request finds the pool as a fresh context would)."""
        with self._lock:
            for slot in self.slots:
                self._drop(slot)

    def _resident(self, wanted: str | None) -> Slot | None:
        if wanted is None:
            return None
        return next((s for s in self.slots if s.owner == wanted and not s.reserved), None)

    def _free_slot(self, wanted: str | None, prompt: list[int]) -> Slot:
        """An empty slot (a prefix on hand elsewhere is copied in), else, for a request without
        a session, the cache without a session it shares the most with; else the least recently
        used cache without a session, then a session's (saved first)."""
        idle = [s for s in self.slots if not s.reserved]
        if empty := [s for s in idle if not s.tokens]:
            return empty[0]
        if wanted is None:
            free = [s for s in idle if s.owner is None]
            best = max(free, key=lambda s: _common_prefix(s.tokens, prompt), default=None)
            if best is not None and _common_prefix(best.tokens, prompt) > 0:
                return best
        slot = min(idle, key=lambda s: (s.owner is not None, s.used))
        self._evict(slot)
        return slot

    def _reuse(self, slot: Slot, prompt: list[int]) -> int:
        if not self._engine.kv_restorable:
            self._drop(slot)
            return 0
        n = _common_prefix(slot.tokens, prompt)
        others = (s for s in self.slots if s is not slot and s.tokens)
        source = max(others, key=lambda s: _common_prefix(s.tokens, prompt), default=None)
        if source is not None and (m := _common_prefix(source.tokens, prompt)) > n:
            self._engine.seq_drop(slot.seq)
            self._engine.seq_copy(source.seq, slot.seq, m)
            slot.tokens, n = prompt[:m], m
        n = min(n, len(prompt) - 1)
        if not self._engine.seq_drop(slot.seq, n):
            n = 0
        del slot.tokens[n:]
        return n

    def _make_room(self, taker: Slot) -> None:
        """Evict idle caches, least recently used first, until what is held fits the pool."""
        while sum(s.reserved or len(s.tokens) for s in self.slots) > self.pool:
            idle = [s for s in self.slots if s is not taker and not s.reserved and s.tokens]
            if not idle:
                return  # fits() promised room: only a cache loaded past its request is over
            self._evict(min(idle, key=lambda s: s.used))

    def _evict(self, slot: Slot) -> None:
        if slot.owner is not None and slot.tokens and self._engine.kv_restorable:
            self._keep(slot.owner, _Saved(slot.tokens, self._engine.seq_save(slot.seq)))
        self._drop(slot)

    def _drop(self, slot: Slot) -> None:
        if slot.tokens:
            self._engine.seq_drop(slot.seq)
        slot.tokens, slot.owner = [], None

    # -- any thread ------------------------------------------------------------------------

    def forget(self, session_id: str) -> None:
        """The session is gone: drop its saved cache now, its resident one at the next
        request (the engine's worker alone touches the context)."""
        with self._lock:
            self._forgotten.append(session_id)
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

    # -- saved caches: memory, then disk ---------------------------------------------------

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


def _common_prefix(a: Iterable[int], b: Iterable[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
