"""Prometheus metrics, updated by the appliance for gRPC and HTTP alike, read at GET /metrics.

Counters and histograms are updated as generations end; gauges (queue, sessions, memory) are
read when scraped, so they are never stale. Each server has a registry of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from edge_llm.types import Chunk

PREFIX = "edge_llm"


@dataclass(frozen=True)
class Live:
    """What the gauges show, read at scrape time."""

    waiting: int
    running: int
    sessions: int
    memory_budget_bytes: int
    memory_planned_bytes: int


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Generations by API (grpc, openai, page) and outcome (stop, length, cancelled, "
            "refused, failed)",
            ["api", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens", registry=r)
        self.reused_tokens = Counter(
            f"{PREFIX}_prompt_tokens_reused", "Prompt tokens found in the KV cache", registry=r
        )
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Generated tokens", registry=r
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time from admission to the engine",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from admission to the first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.decode_rate = Histogram(
            f"{PREFIX}_decode_tokens_per_second",
            "Decode speed of each answer of at least two tokens",
            buckets=(1, 2, 5, 10, 15, 20, 25, 30, 40, 60, 100, 200),
            registry=r,
        )
        ProcessCollector(namespace=PREFIX, registry=r)  # resident memory, CPU seconds, fds

    def watch(self, live: Callable[[], Live | None]) -> None:
        """Gauges from `live` (None: not loaded yet, no gauges)."""
        self.registry.register(_LiveCollector(live))

    def finished(self, api: str, last: Chunk) -> None:
        reason = last.finish_reason.value if last.finish_reason else "cancelled"
        self.requests.labels(api, reason).inc()
        if last.usage is not None:
            self.prompt_tokens.inc(last.usage.prompt_tokens)
            self.reused_tokens.inc(last.usage.prompt_tokens_reused)
            self.completion_tokens.inc(last.usage.completion_tokens)
        if (t := last.timings) is not None:
            self.queue_wait.observe(t.queue_ms / 1e3)
            if last.usage is not None and last.usage.completion_tokens:
                self.first_token.observe(t.time_to_first_token_ms / 1e3)
            if t.decode_tokens_per_second > 0:
                self.decode_rate.observe(t.decode_tokens_per_second)

    def ended_without_answer(self, api: str, refused: bool) -> None:
        """Refused before the engine (queue full, bad input, loading), or failed on the way."""
        self.requests.labels(api, "refused" if refused else "failed").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, live: Callable[[], Live | None]) -> None:
        self._live = live

    def collect(self) -> Iterator[Metric]:
        now = self._live()
        if now is None:
            return
        for name, doc, value in (
            ("queue_waiting", "Requests waiting for the engine", now.waiting),
            ("queue_running", "Requests the engine is running", now.running),
            ("sessions", "Sessions kept", now.sessions),
            ("memory_budget_bytes", "The memory plan's budget", now.memory_budget_bytes),
            (
                "memory_planned_bytes",
                "What the memory plan expects to use",
                now.memory_planned_bytes,
            ),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
