"""Where logs go: the journal, with structured fields, when systemd connected stderr to it;
readable lines on stderr otherwise.

Log calls pass their numbers as `extra={"REQUEST_ID": ..., "PEER": ...}`: upper-case names
become journal fields (`journalctl -u edge-llm REQUEST_ID=12 -o verbose`); the stderr format
shows only the message, which says the same in words.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO


def setup(level: str, env: Mapping[str, str] = os.environ) -> None:
    handler: logging.Handler | None = _journal_handler() if stderr_is_journal(env) else None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def stderr_is_journal(env: Mapping[str, str] = os.environ) -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it gave us; if stderr is
    something else (a wrapper redirected it), lines must go there instead."""
    return is_journal(sys.stderr, env)


def is_journal(stream: TextIO, env: Mapping[str, str] = os.environ) -> bool:
    """The stream goes to the journal (see stderr_is_journal)."""
    try:
        device, inode = (int(part) for part in env.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:  # edge-llm[systemd] not installed: stderr still reaches the journal
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="edge-llm")
    return handler
