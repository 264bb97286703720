"""Faults for the tests that run the real service in a process of its own (tests/test_systemd.py,
scripts/systemd-e2e under a real systemd), where nothing can be patched in from outside. Asked
for with EDGE_LLM_TEST_FAULT; without it, nothing here runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from edge_llm.decoding import SamplerLike, StepEngine
from edge_llm.types import Part, Sampling

log = logging.getLogger(__name__)

ENV = "EDGE_LLM_TEST_FAULT"


def engine(real: StepEngine) -> StepEngine:
    """`real`, or with EDGE_LLM_TEST_FAULT=wedge-worker an engine that hangs from the second
    request on (the first is the warm-up), as on a stuck llama_decode: the watchdog's pings
    must stop."""
    if os.environ.get(ENV) != "wedge-worker":
        return real
    log.warning("%s=wedge-worker: the inference worker will hang on the first request", ENV)
    return _Wedged(real)


class _Wedged:
    def __init__(self, real: StepEngine) -> None:
        self._real = real
        self._requests = 0

    def sampler(self, sampling: Sampling) -> SamplerLike:
        self._requests += 1  # a sampler per request
        return self._real.sampler(sampling)

    def decode(self, parts: Sequence[Part]) -> list[int]:
        if self._requests > 1:
            threading.Event().wait()
        return self._real.decode(parts)

    def sample(self, sampler: Any, row: int) -> int:
        return self._real.sample(sampler, row)

    def is_end(self, token: int) -> bool:
        return self._real.is_end(token)

    def piece(self, token: int) -> bytes:
        return self._real.piece(token)
