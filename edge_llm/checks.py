"""What a request may ask for: the server's limits and the checks of every field, whatever the
protocol. convert.py (gRPC) and openai_convert.py (HTTP) read their payloads into plain values
and build requests here, so a bad field gets the same name and the same range on both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_llm.types import ChatMessage, GenerateRequest, RequestError, Sampling, SamplingDefaults

ROLES = ("system", "user", "assistant")
MAX_PAGE_SIZE = 1000
MAX_TITLE_BYTES = 256


@dataclass(frozen=True)
class Limits:
    context_length: int
    max_tokens: int
    default_max_tokens: int
    queue_depth: int
    parallel: int = 1  # requests that decode at once (the memory plan's, once loaded)
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_messages: int = 256
    max_text_bytes: int = 64 * 1024  # the prompt, or one message's content
    max_request_bytes: int = 1024 * 1024  # a whole request (gRPC enforces it itself)


def size(field: str, text: str, limit: int) -> str:
    n = len(text.encode())
    if n > limit:
        raise RequestError(f"{field} is {n} bytes; the limit is {limit} bytes")
    return text


def in_range(field: str, value: float, low: float, high: float, *, low_open: bool = False) -> float:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise RequestError(f"{field} must be in {bracket}{low:g}, {high:g}]; got {value}")
    return value


# The sampling fields a request and a session's defaults share, with their checks.
SAMPLING_FIELDS: dict[str, Callable[[float], float]] = {
    "temperature": lambda v: in_range("temperature", v, 0, 2),
    "top_p": lambda v: in_range("top_p", v, 0, 1, low_open=True),
    "top_k": lambda v: int(in_range("top_k", v, 0, 1000)),
    "min_p": lambda v: in_range("min_p", v, 0, 1),
    "repeat_penalty": lambda v: in_range("repeat_penalty", v, 0, 2, low_open=True),
    "presence_penalty": lambda v: in_range("presence_penalty", v, -2, 2),
    "frequency_penalty": lambda v: in_range("frequency_penalty", v, -2, 2),
}


def max_tokens(value: int, limits: Limits, field: str = "max_tokens") -> int:
    if not 1 <= value <= limits.max_tokens:
        raise RequestError(
            f"{field} must be in [1, {limits.max_tokens}] (the server's cap); got {value}"
        )
    return value


def seed(value: int) -> int:
    # llama.cpp reads 0xFFFFFFFF as "pick a random seed": it would break "same seed, same answer".
    if not 0 <= value < 0xFFFFFFFF:
        raise RequestError(
            "seed must be below 4294967295 (that value means random in llama.cpp) and not "
            f"negative; got {value}"
        )
    return value


def stop(strings: Sequence[str], limits: Limits) -> tuple[str, ...]:
    if len(strings) > limits.max_stop_strings:
        raise RequestError(
            f"stop has {len(strings)} strings; the limit is {limits.max_stop_strings}"
        )
    for i, s in enumerate(strings):
        if not s:
            raise RequestError(f"stop[{i}] is empty")
        size(f"stop[{i}]", s, limits.max_stop_string_bytes)
    return tuple(strings)


def text_or_messages(
    text: str, messages: Sequence[tuple[str, str]], text_field: str, limits: Limits
) -> tuple[str | None, tuple[ChatMessage, ...]]:
    """Exactly one of a raw text and a conversation of (role, content)."""
    if text and messages:
        raise RequestError(f"set either {text_field} or messages, not both")
    if not text and not messages:
        raise RequestError(f"set {text_field} (raw text) or messages (a conversation)")
    if text:
        return size(text_field, text, limits.max_text_bytes), ()
    if len(messages) > limits.max_messages:
        raise RequestError(
            f"messages has {len(messages)} entries; the limit is {limits.max_messages}"
        )
    out = []
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}"
            )
        out.append(
            ChatMessage(role, size(f"messages[{i}].content", content, limits.max_text_bytes))
        )
    return None, tuple(out)


def request(
    prompt: str | None,
    messages: tuple[ChatMessage, ...],
    given: Mapping[str, Any],
    limits: Limits,
    defaults: SamplingDefaults | None = None,
    session_id: str | None = None,
    ignore_eos: bool = False,
) -> GenerateRequest:
    """A request from the fields a client set (`given`: max_tokens, stop, seed and the sampling
    fields); those it left unset take a session's `defaults`, then the server's."""
    if session_id and (prompt is not None or [m.role for m in messages] != ["user"]):
        raise RequestError(
            'with session_id, send only the new message, in messages (one, role "user"): '
            "the session holds the history"
        )
    d = defaults or SamplingDefaults()
    if "max_tokens" in given:
        tokens = max_tokens(given["max_tokens"], limits)
    elif d.max_tokens is not None:  # checked when the session was made; the cap may be lower now
        tokens = min(d.max_tokens, limits.max_tokens)
    else:
        tokens = limits.default_max_tokens

    def pick(name: str) -> Any:
        return given[name] if name in given else getattr(d, name)

    base = Sampling()
    chosen: dict[str, Any] = {
        name: getattr(base, name) if (v := pick(name)) is None else check(v)
        for name, check in SAMPLING_FIELDS.items()
    }
    chosen_seed = None if (v := pick("seed")) is None else seed(v)
    return GenerateRequest(
        prompt=prompt,
        messages=messages,
        max_tokens=tokens,
        sampling=Sampling(**chosen, seed=chosen_seed),
        stop=stop(given.get("stop") or d.stop, limits),
        ignore_eos=ignore_eos,
        session_id=session_id,
    )


def sampling_defaults(given: Mapping[str, Any], limits: Limits) -> SamplingDefaults:
    """A session's defaults from the fields a client set."""

    def value(name: str, check: Callable[[Any], Any]) -> Any:
        return check(given[name]) if name in given else None

    return SamplingDefaults(
        max_tokens=value("max_tokens", lambda v: max_tokens(v, limits)),
        seed=value("seed", seed),
        stop=stop(given.get("stop", ()), limits),
        **{name: value(name, check) for name, check in SAMPLING_FIELDS.items()},
    )


def session_id(value: str, field: str = "session_id") -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        shown = value if len(value) <= 40 else f"{value[:40]}..."
        raise RequestError(
            f"{field} {shown!r} is not a session id (32 hex digits, from CreateSession)"
        )
    return value


def page_size(requested: int) -> int:
    if not 0 <= requested <= MAX_PAGE_SIZE:
        raise RequestError(f"page_size must be in [0, {MAX_PAGE_SIZE}]; got {requested}")
    return requested or 50
