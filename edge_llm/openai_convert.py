"""OpenAI-style JSON <-> domain types, for /v1/chat/completions, /v1/completions and /v1/models.

Requests are read leniently where clients differ (unknown fields are ignored, `stop` may be a
string or a list, content may be a list of text parts) and strictly where a silent ignore would
mislead (n > 1, tools, a JSON response format, logprobs: refused with a 400 that says so). The
checks and field names are those of checks.py, as on gRPC.

Extensions beyond OpenAI's fields: `session_id` (continue a server-side session: messages then
holds only the new user message), `top_k`, `min_p`, `repeat_penalty`, `ignore_eos`; responses
carry `timings` (as llama.cpp's server does) and, in a session, `session_id` and `notice`.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from edge_llm import checks
from edge_llm.checks import Limits
from edge_llm.types import (
    Chunk,
    FinishReason,
    GenerateRequest,
    RequestError,
    SamplingDefaults,
    Usage,
)

ROLE_ALIASES = {"developer": "system"}  # newer OpenAI models' name for the system role
_NUMBERS = (
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_INTEGERS = ("seed", "top_k")


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _number(body: Mapping[str, Any], name: str) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number; got {_kind(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer past any float: out of every range
        return math.inf


def _integer(body: Mapping[str, Any], name: str) -> int:
    value = body[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer; got {_kind(value)}")
    return value


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise RequestError("n must be 1: this server makes one answer per request")
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise RequestError(f"{name} is not supported by this server (no tool calls yet)")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise RequestError(
            'response_format is not supported by this server (only {"type": "text"}); ask for '
            "JSON in the prompt instead"
        )
    if body.get("logprobs") not in (None, False, 0):
        raise RequestError("logprobs is not supported by this server")
    if body.get("echo"):
        raise RequestError("echo is not supported by this server")
    if body.get("suffix"):
        raise RequestError("suffix is not supported by this server")
    if body.get("best_of") not in (None, 1):
        raise RequestError("best_of must be 1: this server makes one answer per request")


def given_fields(body: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """The generation fields the client set, as checks.request() takes them."""
    present = {k for k, v in body.items() if v is not None}
    given: dict[str, Any] = {n: _number(body, n) for n in _NUMBERS if n in present}
    given.update({n: _integer(body, n) for n in _INTEGERS if n in present})
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        if name in present:
            given["max_tokens"] = checks.max_tokens(_integer(body, name), limits, name)
            break
    if "stop" in present:
        stop = body["stop"]
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise RequestError(f"stop must be a string or an array of strings; got {_kind(stop)}")
        given["stop"] = strings
    return given


def _content(value: Any, i: int) -> str:
    """A message's content: a string, or an array of text parts (joined)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise RequestError(
                    f"messages[{i}].content[{j}] is {kind!r}; this server reads text parts only"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise RequestError(f"messages[{i}].content must be a string or an array of text parts")


def _messages(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise RequestError(f"messages must be an array of messages; got {_kind(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role in ("tool", "function"):
            raise RequestError(f"messages[{i}].role {role!r} is not supported (no tool calls yet)")
        out.append((ROLE_ALIASES.get(str(role), str(role)), _content(m.get("content"), i)))
    return out


def session_id(body: Mapping[str, Any]) -> str | None:
    value = body.get("session_id")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise RequestError(f"session_id must be a string; got {_kind(value)}")
    return checks.session_id(value)


def chat_request(
    body: Mapping[str, Any], limits: Limits, defaults: SamplingDefaults | None
) -> GenerateRequest:
    """POST /v1/chat/completions."""
    _refuse_unsupported(body)
    if "messages" not in body:
        raise RequestError("messages is required: the conversation, oldest first")
    messages = _messages(body["messages"])
    if not messages:
        raise RequestError("messages is empty; send at least one message")
    _, chat = checks.text_or_messages("", messages, "prompt", limits)
    return checks.request(
        None,
        chat,
        given_fields(body, limits),
        limits,
        defaults,
        session_id(body),
        _ignore_eos(body),
    )


def completion_request(body: Mapping[str, Any], limits: Limits) -> GenerateRequest:
    """POST /v1/completions: a raw prompt, no chat template."""
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(
            "prompt must be a string (or an array of one string); token arrays and several "
            "prompts are not supported"
        )
    if body.get("session_id"):
        raise RequestError("session_id is for /v1/chat/completions, not /v1/completions")
    text, _ = checks.text_or_messages(prompt, [], "prompt", limits)
    return checks.request(
        text, (), given_fields(body, limits), limits, ignore_eos=_ignore_eos(body)
    )


def _ignore_eos(body: Mapping[str, Any]) -> bool:
    value = body.get("ignore_eos", False)
    if not isinstance(value, bool):
        raise RequestError(f"ignore_eos must be true or false; got {_kind(value)}")
    return value


def streaming(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """Whether to stream, and to add usage in a last chunk (stream_options.include_usage)."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false; got {_kind(stream)}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(f"stream_options must be an object; got {_kind(options)}")
    return stream, bool(options.get("include_usage"))


# -- responses ---------------------------------------------------------------------------


class Ids:
    """The id, creation time and model name that every chunk of one response repeats."""

    def __init__(self, kind: str, model: str) -> None:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def header(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def finish_reason(chunk: Chunk) -> str | None:
    if chunk.finish_reason is None:
        return None
    return "length" if chunk.finish_reason is FinishReason.LENGTH else "stop"


def usage(u: Usage | None) -> dict[str, Any] | None:
    if u is None:
        return None
    total = u.prompt_tokens + u.completion_tokens
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": total,
        # Prompt tokens whose KV cache was reused (a session's history, a shared prefix).
        "prompt_tokens_details": {"cached_tokens": u.prompt_tokens_reused},
    }


def extensions(chunk: Chunk, session: str | None) -> dict[str, Any]:
    """What the last chunk adds beyond OpenAI's fields."""
    out: dict[str, Any] = {}
    if chunk.timings is not None:
        out["timings"] = asdict(chunk.timings)
    if session is not None:
        out["session_id"] = session
    if chunk.notice:
        out["notice"] = chunk.notice
    return out


def chat_chunk(ids: Ids, delta: dict[str, str], chunk: Chunk | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
    if chunk is not None:
        choice["finish_reason"] = finish_reason(chunk)
    return {**ids.header("chat.completion.chunk"), "choices": [choice]}


def completion_chunk(ids: Ids, text: str, chunk: Chunk | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
    if chunk is not None:
        choice["finish_reason"] = finish_reason(chunk)
    return {**ids.header("text_completion"), "choices": [choice]}


def usage_chunk(ids: Ids, kind: str, last: Chunk) -> dict[str, Any]:
    """stream_options.include_usage: one more chunk, no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {**ids.header(obj), "choices": [], "usage": usage(last.usage)}


def chat_completion(ids: Ids, text: str, last: Chunk, session: str | None) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason(last),
    }
    return {
        **ids.header("chat.completion"),
        "choices": [choice],
        "usage": usage(last.usage),
        **extensions(last, session),
    }


def text_completion(ids: Ids, text: str, last: Chunk) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(last)}
    return {
        **ids.header("text_completion"),
        "choices": [choice],
        "usage": usage(last.usage),
        **extensions(last, None),
    }


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "edge-llm"}


def error(message: str, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
