"""Continuous batching: every running request advances in the same llama_decode.

Decoding one token costs about as much as reading the weights once, and one read serves many
sequences. So each step, every sequence that is answering contributes the token it sampled
last, and sequences still reading their prompts contribute a chunk of it, first come first
served; the engine decodes all of it in one call, and each answering sequence samples its next
token from its own row with its own sampler. While anything is answering, prompts get a small
chunk per step: a long new prompt then delays the running streams by one chunk per token, not
by its whole length. With nothing answering, prompts get the whole batch.

Only the scheduler's worker thread calls this module; it streams text into each Job's outbox.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_llm.kvstates import Slot
from edge_llm.textstream import TextStream
from edge_llm.types import Chunk, FinishReason, GenerateRequest, GenerationStats, Part, Sampling

# Prompt tokens per step while other sequences are answering: each of their next tokens then
# waits for this many prompt tokens too (BENCHMARKS.md measures the longest gap it makes), and
# a chat message of this size still gets its first token after one step.
PROMPT_CHUNK = 128

_ids = itertools.count(1)


class SamplerLike(Protocol):
    def close(self) -> None: ...


class StepEngine(Protocol):
    def decode(self, parts: Sequence[Part]) -> list[int]: ...
    def sampler(self, sampling: Sampling) -> SamplerLike: ...
    def sample(self, sampler: Any, row: int) -> int: ...  # a sampler() of the same engine
    def is_end(self, token: int) -> bool: ...
    def piece(self, token: int) -> bytes: ...


@dataclass(eq=False)
class Job:
    """A request on its way through the queue and the engine."""

    request: GenerateRequest
    prompt: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)
    id: int = field(default_factory=lambda: next(_ids))
    peer: str = ""
    owner: str = ""  # the caller's name (a token's), for the per-client queue limit
    received_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    # Set by the RPC-done callback (client cancelled, went away, or passed its deadline).
    cancelled: threading.Event = field(default_factory=threading.Event)
    outbox: queue.SimpleQueue[Chunk | BaseException] = field(default_factory=queue.SimpleQueue)
    # Why the server cancelled it (shutdown), for the last message; empty if the client did.
    notice: str = ""

    def chunks(self) -> Iterator[Chunk]:
        """What the engine produces, as it produces it; the last chunk has finish_reason."""
        while True:
            item = self.outbox.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


@dataclass(eq=False)
class Running:
    """A job in the engine: its sequence, what is left of its prompt, how it samples."""

    job: Job
    slot: Slot
    todo: list[int]  # prompt tokens not yet decoded; empty once it answers
    sampler: SamplerLike
    text: TextStream
    max_tokens: int
    token: int = -1  # sampled last, decoded in the next step


class Batch:
    def __init__(self, engine: StepEngine, batch_size: int, context_length: int) -> None:
        self._engine = engine
        self._batch_size = batch_size
        self._context_length = context_length
        self.running: list[Running] = []  # in the order they came

    def add(self, job: Job, slot: Slot, reused: int) -> Running:
        """Start `job` in `slot`, whose cache already holds the prompt's first `reused` tokens."""
        request, stats = job.request, job.stats
        stats.prompt_tokens, stats.prompt_tokens_reused = len(job.prompt), reused
        running = Running(
            job,
            slot,
            job.prompt[reused:],
            self._engine.sampler(request.sampling),
            TextStream(request.stop),
            min(request.max_tokens, self._context_length - len(job.prompt)),
        )
        self.running.append(running)
        return running

    def remove(self, running: Running) -> None:
        running.sampler.close()
        self.running.remove(running)

    def step(self) -> list[Running]:
        """One llama_decode for every running sequence; those that finished in it (their
        stats.finish_reason is set). EngineError if llama.cpp failed it."""
        parts: list[Part] = []
        owners: list[Running] = []
        answering = [r for r in self.running if not r.todo]
        for r in answering:
            parts.append(Part(r.slot.seq, len(r.slot.tokens), (r.token,), True))
            owners.append(r)
        budget = self._batch_size - len(answering)
        if answering:
            budget = min(budget, PROMPT_CHUNK)
        for r in self.running:
            if r.todo and budget > 0:
                chunk = r.todo[:budget]
                parts.append(Part(r.slot.seq, len(r.slot.tokens), chunk, chunk == r.todo))
                owners.append(r)
                budget -= len(chunk)
        rows = self._engine.decode(parts)
        finished = []
        for part, row, r in zip(parts, rows, owners, strict=True):
            r.slot.tokens.extend(part.tokens)
            if r.todo:
                del r.todo[: len(part.tokens)]
                r.job.stats.prompt_tokens_processed += len(part.tokens)
            if row >= 0 and self._answer(r, self._engine.sample(r.sampler, row)):
                finished.append(r)
        return finished

    def _answer(self, r: Running, token: int) -> bool:
        """Take a sampled token; True if the answer is complete."""
        stats, request = r.job.stats, r.job.request
        now = time.monotonic()
        stats.first_token_at = stats.first_token_at or now
        stats.last_token_at = now
        if self._engine.is_end(token) and not request.ignore_eos:
            return self._finish(r, FinishReason.STOP)
        stats.completion_tokens += 1
        if delta := r.text.push(self._engine.piece(token)):
            r.job.outbox.put(Chunk(delta))
        if r.text.stopped:
            stats.finish_reason = FinishReason.STOP
            return True
        if stats.completion_tokens >= r.max_tokens:
            return self._finish(r, FinishReason.LENGTH)
        r.token = token
        return False

    def _finish(self, r: Running, reason: FinishReason) -> bool:
        r.job.stats.finish_reason = reason
        if tail := r.text.finish():  # held back as a possible stop string: it was not one
            r.job.outbox.put(Chunk(tail))
        return True
