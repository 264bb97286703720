"""protobuf <-> domain types, and the validation of what clients send.

Every check names the field and the allowed range, so a grpcurl user can fix the request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from edge_llm import __version__
from edge_llm.memory import MemoryPlan
from edge_llm.types import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerateRequest,
    ModelInfo,
    RequestError,
    RuntimeInfo,
    Sampling,
    SamplingDefaults,
    Session,
)
from edge_llm.v1 import edge_llm_pb2 as pb

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Limits:
    context_length: int
    max_tokens: int
    default_max_tokens: int
    queue_depth: int
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256
    max_messages: int = 256
    max_text_bytes: int = 64 * 1024  # the prompt, or one message's content
    max_request_bytes: int = 1024 * 1024  # enforced by gRPC itself

    def to_pb(self) -> pb.Limits:
        return pb.Limits(
            context_length=self.context_length,
            max_tokens=self.max_tokens,
            default_max_tokens=self.default_max_tokens,
            queue_depth=self.queue_depth,
            max_stop_strings=self.max_stop_strings,
            max_stop_string_bytes=self.max_stop_string_bytes,
            max_messages=self.max_messages,
            max_request_bytes=self.max_request_bytes,
        )


def _text_or_messages(
    text: str, messages: list[pb.Message], text_field: str, limits: Limits
) -> tuple[str | None, tuple[ChatMessage, ...]]:
    if text and messages:
        raise RequestError(f"set either {text_field} or messages, not both")
    if not text and not messages:
        raise RequestError(f"set {text_field} (raw text) or messages (a conversation)")
    if text:
        _check_size(text_field, text, limits.max_text_bytes)
        return text, ()
    if len(messages) > limits.max_messages:
        raise RequestError(
            f"messages has {len(messages)} entries; the limit is {limits.max_messages}"
        )
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m.role!r}"
            )
        _check_size(f"messages[{i}].content", m.content, limits.max_text_bytes)
        out.append(ChatMessage(m.role, m.content))
    return None, tuple(out)


def _check_size(field: str, text: str, limit: int) -> None:
    size = len(text.encode())
    if size > limit:
        raise RequestError(f"{field} is {size} bytes; the limit is {limit} bytes")


def _in_range(
    field: str, value: float, low: float, high: float, *, low_open: bool = False
) -> float:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise RequestError(f"{field} must be in {bracket}{low:g}, {high:g}]; got {value}")
    return value


# The sampling fields GenerateRequest and SamplingDefaults share, with their checks.
_SAMPLING_FIELDS: dict[str, Callable[[float], float]] = {
    "temperature": lambda v: _in_range("temperature", v, 0, 2),
    "top_p": lambda v: _in_range("top_p", v, 0, 1, low_open=True),
    "top_k": lambda v: int(_in_range("top_k", v, 0, 1000)),
    "min_p": lambda v: _in_range("min_p", v, 0, 1),
    "repeat_penalty": lambda v: _in_range("repeat_penalty", v, 0, 2, low_open=True),
}


def _max_tokens(value: int, limits: Limits) -> int:
    if not 1 <= value <= limits.max_tokens:
        raise RequestError(
            f"max_tokens must be in [1, {limits.max_tokens}] (the server's cap); got {value}"
        )
    return value


def _seed(value: int) -> int:
    # llama.cpp reads 0xFFFFFFFF as "pick a random seed": it would break "same seed, same answer".
    if value == 0xFFFFFFFF:
        raise RequestError("seed must be below 4294967295 (that value means random in llama.cpp)")
    return value


def _stop(stop: Sequence[str], limits: Limits) -> tuple[str, ...]:
    if len(stop) > limits.max_stop_strings:
        raise RequestError(f"stop has {len(stop)} strings; the limit is {limits.max_stop_strings}")
    for i, s in enumerate(stop):
        if not s:
            raise RequestError(f"stop[{i}] is empty")
        _check_size(f"stop[{i}]", s, limits.max_stop_string_bytes)
    return tuple(stop)


def generate_request_from_pb(
    msg: pb.GenerateRequest, limits: Limits, defaults: SamplingDefaults | None = None
) -> GenerateRequest:
    """Validate a request; the sampling fields it leaves unset take a session's `defaults`,
    then the server's."""
    prompt, messages = _text_or_messages(msg.prompt, list(msg.messages), "prompt", limits)
    if msg.session_id and (prompt is not None or [m.role for m in messages] != ["user"]):
        raise RequestError(
            'with session_id, send only the new message, in messages (one, role "user"): '
            "the session holds the history"
        )
    d = defaults or SamplingDefaults()

    def pick(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else getattr(d, name)

    if msg.HasField("max_tokens"):
        max_tokens = _max_tokens(msg.max_tokens, limits)
    elif d.max_tokens is not None:  # checked when the session was made; the cap may be lower now
        max_tokens = min(d.max_tokens, limits.max_tokens)
    else:
        max_tokens = limits.default_max_tokens
    seed = pick("seed")
    base = Sampling()
    chosen: dict[str, Any] = {
        name: getattr(base, name) if (v := pick(name)) is None else check(v)
        for name, check in _SAMPLING_FIELDS.items()
    }
    sampling = Sampling(**chosen, seed=None if seed is None else _seed(seed))
    return GenerateRequest(
        prompt=prompt,
        messages=messages,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=_stop(msg.stop or d.stop, limits),
        ignore_eos=msg.ignore_eos,
        session_id=msg.session_id or None,
    )


def session_id(value: str, field: str = "session_id") -> str:
    if not re.fullmatch(r"[0-9a-f]{32}", value):
        shown = value if len(value) <= 40 else f"{value[:40]}..."
        raise RequestError(
            f"{field} {shown!r} is not a session id (32 hex digits, from CreateSession)"
        )
    return value


def text(field: str, value: str, limits: Limits) -> str:
    _check_size(field, value, limits.max_text_bytes)
    return value


MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested > MAX_PAGE_SIZE:
        raise RequestError(f"page_size must be at most {MAX_PAGE_SIZE}; got {requested}")
    return requested or 50


def sampling_defaults_from_pb(msg: pb.SamplingDefaults, limits: Limits) -> SamplingDefaults:
    def value(name: str, check: Callable[[Any], Any]) -> Any:
        return check(getattr(msg, name)) if msg.HasField(name) else None

    return SamplingDefaults(
        max_tokens=value("max_tokens", lambda v: _max_tokens(v, limits)),
        seed=value("seed", _seed),
        stop=_stop(msg.stop, limits),
        **{name: value(name, check) for name, check in _SAMPLING_FIELDS.items()},
    )


def sampling_defaults_to_pb(d: SamplingDefaults) -> pb.SamplingDefaults:
    values = {k: v for k, v in asdict(d).items() if v is not None and k != "stop"}
    return pb.SamplingDefaults(stop=d.stop, **values)


def session_to_pb(session: Session) -> pb.Session:
    msg = pb.Session(
        id=session.id,
        system_prompt=session.system_prompt,
        defaults=sampling_defaults_to_pb(session.defaults),
        messages=[pb.Message(role=m.role, content=m.content) for m in session.messages],
        message_count=session.message_count,
        dropped_messages=session.dropped_messages,
    )
    msg.create_time.FromNanoseconds(int(session.created_at * 1e9))
    msg.update_time.FromNanoseconds(int(session.updated_at * 1e9))
    return msg


def tokenize_request_from_pb(
    msg: pb.TokenizeRequest, limits: Limits
) -> tuple[str | None, tuple[ChatMessage, ...]]:
    return _text_or_messages(msg.text, list(msg.messages), "text", limits)


_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def chunk_to_pb(chunk: Chunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(text=chunk.text, notice=chunk.notice)
    if chunk.finish_reason is not None:
        msg.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        msg.usage.prompt_tokens = chunk.usage.prompt_tokens
        msg.usage.completion_tokens = chunk.usage.completion_tokens
    if chunk.timings is not None:
        t = chunk.timings
        msg.timings.CopyFrom(
            pb.Timings(
                queue_ms=t.queue_ms,
                prompt_ms=t.prompt_ms,
                time_to_first_token_ms=t.time_to_first_token_ms,
                decode_tokens_per_second=t.decode_tokens_per_second,
                total_ms=t.total_ms,
            )
        )
    return msg


def info_to_pb(
    model: ModelInfo, runtime: RuntimeInfo, limits: Limits, memory: MemoryPlan
) -> pb.GetInfoResponse:
    v = runtime.versions
    return pb.GetInfoResponse(
        model=pb.ModelInfo(
            name=model.name,
            path=model.path,
            architecture=model.architecture,
            quantization=model.quantization,
            parameter_count=model.parameter_count,
            size_bytes=model.size_bytes,
            trained_context_length=model.trained_context_length,
            sha256=model.sha256,
            has_chat_template=model.has_chat_template,
        ),
        runtime=pb.RuntimeInfo(
            edge_llm_version=__version__,
            llama_cpp_python_version=v.get("llama_cpp_python", ""),
            grpcio_version=v.get("grpcio", ""),
            protobuf_version=v.get("protobuf", ""),
            python_version=v.get("python", ""),
            threads=runtime.threads,
            threads_batch=runtime.threads_batch,
            cpu_features=list(runtime.cpu_features),
            system_info=runtime.system_info,
            board=runtime.board,
            threads_reason=runtime.threads_reason,
            cpu_variant=runtime.cpu_variant,
            cpu_variant_reason=runtime.cpu_variant_reason,
            cpu_variants_rejected=runtime.cpu_variants_rejected,
        ),
        limits=limits.to_pb(),
        memory=pb.MemoryPlan(
            budget_bytes=memory.budget,
            total_bytes=memory.total,
            weights_bytes=memory.weights,
            kv_cache_bytes=memory.kv,
            kv_bytes_per_token=memory.kv_per_token,
            compute_bytes=memory.compute,
            runtime_bytes=memory.runtime,
            context_length=memory.context_length,
            requested_context_length=memory.requested_context,
            cache_type=memory.cache_type,
            session_cache_bytes=memory.sessions,
            budget_reason=memory.budget_why,
        ),
    )
