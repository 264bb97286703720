"""Faults for the tests that run the real service in a process of its own (tests/test_systemd.py,
scripts/systemd-e2e under a real systemd), where nothing can be patched in from outside. Asked
for with EDGE_LLM_TEST_FAULT; without it, nothing here runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator

from edge_llm.admission import EngineLike
from edge_llm.types import GenerateRequest, GenerationStats

log = logging.getLogger(__name__)

ENV = "EDGE_LLM_TEST_FAULT"


def engine(real: EngineLike) -> EngineLike:
    """`real`, or with EDGE_LLM_TEST_FAULT=wedge-worker an engine that hangs from the second
    request on (the first is the warm-up), as on a stuck llama_decode: the watchdog's pings
    must stop."""
    if os.environ.get(ENV) != "wedge-worker":
        return real
    log.warning("%s=wedge-worker: the inference worker will hang on the first request", ENV)
    return _Wedged(real)


class _Wedged:
    def __init__(self, real: EngineLike) -> None:
        self._real = real
        self._warmed_up = False

    def generate(
        self,
        prompt: list[int],
        request: GenerateRequest,
        cancelled: Callable[[], bool],
        stats: GenerationStats,
    ) -> Iterator[str]:
        if self._warmed_up:
            threading.Event().wait()
        self._warmed_up = True
        return self._real.generate(prompt, request, cancelled, stats)
