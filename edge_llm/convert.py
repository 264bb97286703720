"""protobuf <-> domain types. The checks of what clients send are in checks.py: each names
the field and the allowed range, so a grpcurl user can fix the request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from google.protobuf.message import Message

from edge_llm import __version__, checks
from edge_llm.checks import Limits
from edge_llm.memory import MemoryPlan
from edge_llm.types import (
    ChatMessage,
    Chunk,
    FinishReason,
    GenerateRequest,
    ModelInfo,
    RuntimeInfo,
    SamplingDefaults,
    Session,
    SessionChanges,
)
from edge_llm.v1 import edge_llm_pb2 as pb


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(
        context_length=limits.context_length,
        max_tokens=limits.max_tokens,
        default_max_tokens=limits.default_max_tokens,
        queue_depth=limits.queue_depth,
        max_stop_strings=limits.max_stop_strings,
        max_stop_string_bytes=limits.max_stop_string_bytes,
        max_messages=limits.max_messages,
        max_request_bytes=limits.max_request_bytes,
        parallel=limits.parallel,
    )


def _given(msg: Message, names: Iterable[str]) -> dict[str, Any]:
    """The optional fields the client set (proto3 `optional`: HasField tells)."""
    return {name: getattr(msg, name) for name in names if msg.HasField(name)}


_REQUEST_FIELDS = ("max_tokens", "seed", *checks.SAMPLING_FIELDS)


def _messages(messages: Iterable[pb.Message]) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages]


def generate_request_from_pb(
    msg: pb.GenerateRequest, limits: Limits, defaults: SamplingDefaults | None = None
) -> GenerateRequest:
    """Validate a request; the sampling fields it leaves unset take a session's `defaults`,
    then the server's."""
    prompt, chat = checks.text_or_messages(msg.prompt, _messages(msg.messages), "prompt", limits)
    given = _given(msg, _REQUEST_FIELDS)
    if msg.stop:
        given["stop"] = list(msg.stop)
    return checks.request(
        prompt, chat, given, limits, defaults, msg.session_id or None, msg.ignore_eos
    )


def sampling_defaults_from_pb(msg: pb.SamplingDefaults, limits: Limits) -> SamplingDefaults:
    given = _given(msg, _REQUEST_FIELDS)
    if msg.stop:
        given["stop"] = list(msg.stop)
    return checks.sampling_defaults(given, limits)


def session_changes_from_pb(msg: pb.UpdateSessionRequest, limits: Limits) -> SessionChanges:
    def text(name: str, limit: int) -> str | None:
        return checks.size(name, getattr(msg, name), limit) if msg.HasField(name) else None

    return SessionChanges(
        title=text("title", checks.MAX_TITLE_BYTES),
        system_prompt=text("system_prompt", limits.max_text_bytes),
        defaults=sampling_defaults_from_pb(msg.defaults, limits)
        if msg.HasField("defaults")
        else None,
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
        title=session.title,
    )
    msg.create_time.FromNanoseconds(int(session.created_at * 1e9))
    msg.update_time.FromNanoseconds(int(session.updated_at * 1e9))
    return msg


def tokenize_request_from_pb(
    msg: pb.TokenizeRequest, limits: Limits
) -> tuple[str | None, tuple[ChatMessage, ...]]:
    return checks.text_or_messages(msg.text, _messages(msg.messages), "text", limits)


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
        limits=limits_to_pb(limits),
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
