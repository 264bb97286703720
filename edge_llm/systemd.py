"""systemd integration: sd_notify (READY, STATUS, WATCHDOG, STOPPING) through systemd-python.

Without NOTIFY_SOCKET (not under systemd, or a unit that is not Type=notify) every call is a
no-op, so the service runs the same from a shell.

The watchdog is only fed while the inference worker is alive and making progress: a worker
stuck inside llama.cpp stops the pings, and systemd kills and restarts the service.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
STATUS_EVERY = 5.0  # seconds between STATUS= updates when there is no watchdog to pace them


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self.watchdog_seconds = _watchdog_seconds(env)
        self._notify: Callable[[str], object] | None = None
        if env.get("NOTIFY_SOCKET"):
            try:
                from systemd import daemon  # type: ignore[attr-defined]
            except ImportError:
                log.warning(
                    "NOTIFY_SOCKET is set but systemd-python is not installed: systemd will "
                    "not learn that the service is ready; install edge-llm[systemd]"
                )
            else:
                self._notify = daemon.notify

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str, seconds: float) -> None:
        """STOPPING=1, and ask systemd for `seconds` more before it kills us (systemd >= 236;
        older ones ignore it and TimeoutStopSec= alone applies)."""
        self._send(f"STOPPING=1\nSTATUS={status}\nEXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def _send(self, state: str) -> None:
        if self._notify is not None:
            self._notify(state)


def _watchdog_seconds(env: Mapping[str, str]) -> float:
    """WATCHDOG_USEC in seconds if the watchdog is meant for this process, else 0."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0"))
    except ValueError:
        return 0.0
    if usec <= 0 or (pid and pid != os.getpid()):
        return 0.0
    return usec / 1e6


class Watchdog:
    """A thread that feeds the watchdog at half its timeout while the worker is healthy, and
    keeps the STATUS= line `systemctl status` shows up to date.

    `stalled_for()` is how long the inference worker has gone without progress (inf if it
    died). A stall as long as the watchdog timeout (60 s without one) stops the pings and
    calls `on_stall(True)` (health turns NOT_SERVING, for supervisors without a watchdog, such
    as a Kubernetes liveness probe); if the worker comes back first, both resume.
    """

    def __init__(
        self,
        notifier: Notifier,
        stalled_for: Callable[[], float],
        status: Callable[[], str],
        on_stall: Callable[[bool], None],
    ) -> None:
        self._notifier = notifier
        self._stalled_for = stalled_for
        self._status = status
        self._on_stall = on_stall
        timeout = notifier.watchdog_seconds
        self._tick = timeout / 2 if timeout else STATUS_EVERY
        self._stall_limit = timeout or 60.0  # without a watchdog: only reported in STATUS
        self._stop = threading.Event()
        self._last_error = ""
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        last_status, stalled_before = "", False
        while True:
            stalled = self._safely("reading the worker", self._stalled_for, float("inf"))
            if stalled >= self._stall_limit:
                status = f"inference worker stalled for {stalled:.0f} s: watchdog pings stopped"
                if not stalled_before:
                    log.error("%s; health NOT_SERVING, systemd will restart the service", status)
                    self._safely("turning health", lambda: self._on_stall(True), None)
                stalled_before = True
            else:
                if stalled_before:
                    log.warning("inference worker made progress again: watchdog pings resume")
                    self._safely("turning health", lambda: self._on_stall(False), None)
                stalled_before = False
                if self._notifier.watchdog_seconds:
                    self._safely("WATCHDOG=1", self._notifier.watchdog, None)
                status = self._safely("the status line", self._status, last_status)
            if status != last_status:
                self._safely("STATUS=", functools.partial(self._notifier.status, status), None)
                last_status = status
            if self._stop.wait(self._tick):
                return

    def _safely(self, what: str, step: Callable[[], T], otherwise: T) -> T:
        """One step of the loop: an error in it is logged, and the loop (whose pings keep a
        healthy service alive) carries on."""
        try:
            return step()
        except Exception as e:
            if str(e) != self._last_error:  # once, not every tick
                log.exception("watchdog: %s failed; the watchdog carries on", what)
                self._last_error = str(e)
            return otherwise
