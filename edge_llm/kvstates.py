"""The KV cache's sequences: which conversation each holds, and where the others' caches wait.

The engine's context has one pool of KV cells shared by one sequence (slot) per request that
decodes at once. A running request holds a slot and has reserved the cells it may fill (its
prompt and its longest answer), so running requests never run out of cells.

Every cell in the pool costs every step: llama.cpp's attention reads the mask of every cell up
to the last one in use, whatever sequence it belongs to (a 107-token prompt took 6-30 % longer
beside 8 idle caches; BENCHMARKS.md). So a finished request's cache stays in its slot only while
nothing else runs, which is when a conversation's next turn usually comes: it then starts from
there at no cost. Once another request runs beside it, the cache is saved and leaves the pool.
Saved caches wait in memory up to a budget (part of the memory plan), least recently used first
out: a session's then go to files under the state directory up to a disk budget (beyond it, the
least recently used files go), a cache without a session is dropped.

A request starts from the longest prefix of its prompt on hand: in its own slot, in a running
sequence (copied: the cells are shared, not duplicated), or in a saved cache (loaded, then cut to
the prefix). So a shared system prompt, or the earlier turns an OpenAI client sends again, is
computed once. A lost or refused cache costs time, never correctness: the engine then processes
the conversation from its history. So when the disk is full, the caches go first.

acquire() and release() run on the engine's worker thread, the only one that touches the
engine; forget() and free_disk() may come from any thread and only change bookkeeping.
"""

from __future__ import annotations

import itertools
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


@dataclass
class _Saved:
    tokens: list[int]
    data: bytearray
    session_id: str | None  # None: a request's without a session


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
        self._dir = directory
        self.memory_budget = memory_budget
        # Saved caches, least recently used first: by session id, or "#n" without a session.
        self._memory: OrderedDict[str, _Saved] = OrderedDict()
        self._memory_bytes = 0
        self._stateless = itertools.count(1)
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
        """Whether a request that may fill `cells` cells can start now (idle caches give way)."""
        with self._lock:
            running = [s for s in self.slots if s.reserved]
            reserved = sum(s.reserved for s in running)
            return len(running) < len(self.slots) and reserved + cells <= self.pool

    def acquire(self, session_id: str | None, prompt: list[int], cells: int) -> tuple[Slot, int]:
        """A slot for a request that fits(); its cache then holds the longest prefix of
        `prompt` on hand, and that length is returned (never the whole prompt: the last
        token's logits are what the answer starts from). None as `session_id`: a request
        without a session."""
        with self._lock:
            idle = [s for s in self.slots if not s.reserved]
            for s in idle:
                if s.owner is not None and s.owner in self._forgotten:
                    self._drop(s)  # deleted since: its cache must not outlive it
            # Taken before anything is evicted: saving caches may push it out of the budgets.
            resident = any(s.owner == session_id for s in idle)
            own = self._take(session_id) if session_id is not None and not resident else None
            slot = self._slot_for(session_id, idle)
            if self._engine.kv_restorable:
                n = self._bring_prefix(slot, prompt, idle, own)
            else:  # a recurrent state cannot be cut back to a prefix: nothing is reused
                for s in idle:
                    self._drop(s)
                n = 0
            # A deleted session's queued request still owns its slot: release() drops the cache.
            slot.reserved, slot.owner = cells, session_id
            return slot, n

    def release(self, slot: Slot, intact: bool = True) -> None:
        """The request is over. Its cache stays in the slot while nothing else runs, else it
        is saved and leaves the pool. `intact` False: the request failed in the engine and what
        the cache holds is unknown, so it is dropped."""
        with self._lock:
            slot.reserved = 0
            if not intact or slot.owner in self._forgotten:
                self._drop(slot)
            elif any(s.reserved for s in self.slots):
                self._evict(slot)

    def clear(self) -> None:
        """Drop every cache without a session; only while nothing runs (after the warm-up, so
        that the first request finds the pool as a fresh context would)."""
        with self._lock:
            for slot in self.slots:
                self._drop(slot)
            for key in [k for k, saved in self._memory.items() if saved.session_id is None]:
                self._unkeep(key)

    def _slot_for(self, wanted: str | None, idle: list[Slot]) -> Slot:
        """The session's own slot, else an empty one, else any idle one (they all leave the
        pool now). Another's cache is never cut to a prefix: the prefix is copied from it."""
        own = next((s for s in idle if wanted is not None and s.owner == wanted), None)
        slot = own or next((s for s in idle if not s.tokens), idle[0])
        if slot is not own:
            self._evict(slot)
        return slot

    def _bring_prefix(
        self, slot: Slot, prompt: list[int], idle: list[Slot], own: _Saved | None
    ) -> int:
        """Put the longest prefix of `prompt` on hand into `slot`; its length. A running
        sequence's (or an idle one's) is copied before the idle ones leave the pool; a saved
        one (the session's `own`, else the best in memory) is loaded into the room they leave."""
        n = _common_prefix(slot.tokens, prompt)
        others = [s for s in self.slots if s is not slot and s.tokens]
        source = max(others, key=lambda s: _common_prefix(s.tokens, prompt), default=None)
        if source is not None and (m := _common_prefix(source.tokens, prompt)) > n:
            self._engine.seq_drop(slot.seq)
            self._engine.seq_copy(source.seq, slot.seq, m)
            slot.tokens, n = prompt[:m], m
        for s in idle:  # a step is about to run: idle caches leave the pool
            if s is not slot:
                self._evict(s)
        key, saved = ("", own) if own is not None else self._best_saved(prompt)
        # Loaded whole, then cut: only if the pool has room for all of it beside the others.
        room = self.pool - sum(s.reserved for s in self.slots if s is not slot)
        if (
            saved is not None
            and _common_prefix(saved.tokens, prompt) > n
            and len(saved.tokens) <= room
        ):
            self._engine.seq_drop(slot.seq)
            if self._engine.seq_load(slot.seq, saved.data):
                slot.tokens, n = list(saved.tokens), _common_prefix(saved.tokens, prompt)
                if key and saved.session_id is None:  # taken; another session's stays theirs
                    self._unkeep(key)
            else:
                slot.tokens, n = [], 0
                log.warning("a saved KV cache was refused; processing the prompt instead")
        return self._cut(slot, min(n, len(prompt) - 1))

    def _cut(self, slot: Slot, n: int) -> int:
        """Keep the first n cached tokens of `slot` (all of them lost if the model cannot)."""
        if not self._engine.seq_drop(slot.seq, n):
            self._engine.seq_drop(slot.seq)
            n = 0
        del slot.tokens[n:]
        return n

    def _best_saved(self, prompt: list[int]) -> tuple[str, _Saved | None]:
        """The cache in memory that shares the most with `prompt`, and its key."""
        return max(
            self._memory.items(),
            key=lambda item: _common_prefix(item[1].tokens, prompt),
            default=("", None),
        )

    def _evict(self, slot: Slot) -> None:
        """Save the slot's cache, then empty it."""
        if slot.tokens and self._engine.kv_restorable and slot.owner not in self._forgotten:
            key = slot.owner or f"#{next(self._stateless)}"
            self._keep(key, _Saved(slot.tokens, self._engine.seq_save(slot.seq), slot.owner))
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
            self._unkeep(session_id)
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

    def _keep(self, key: str, saved: _Saved) -> None:
        self._unkeep(key)
        self._memory[key] = saved
        self._memory_bytes += len(saved.data)
        while self._memory_bytes > self.memory_budget and self._memory:
            # Caches without a session go first: a session's is a kept conversation's.
            victim = next((k for k, v in self._memory.items() if v.session_id is None), None)
            victim = victim or next(iter(self._memory))
            old = self._memory.pop(victim)
            self._memory_bytes -= len(old.data)
            if old.session_id is not None:
                self._spill(victim, old)

    def _take(self, session_id: str) -> _Saved | None:
        saved = self._memory.get(session_id)
        self._unkeep(session_id)
        if saved is None:
            return self._unspill(session_id)
        self._unlink(session_id)  # an older copy on disk, if any, is out of date
        return saved

    def _unkeep(self, key: str) -> None:
        if (saved := self._memory.pop(key, None)) is not None:
            self._memory_bytes -= len(saved.data)

    def _file(self, session_id: str) -> Path:
        return self._dir / f"{session_id}.kv"

    def _unlink(self, session_id: str) -> None:
        self._disk_bytes -= self._disk.pop(session_id, 0)
        self._file(session_id).unlink(missing_ok=True)

    def _spill(self, session_id: str, saved: _Saved) -> None:
        self._unlink(session_id)  # an older copy of the same session's
        size = len(_MAGIC) + 4 + 4 * len(saved.tokens) + len(saved.data)
        if size > self.disk_budget:
            return  # it alone is over the budget: reprocessing it is the cheaper loss
        while self._disk and self._disk_bytes + size > self.disk_budget:
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
        return _Saved(tokens.tolist(), data, session_id)


def _common_prefix(a: Iterable[int], b: Iterable[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
