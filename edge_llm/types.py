"""Domain types: what a request asks for and what the engine streams back.

The engine and the queue see only these; protobuf stays in convert.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached or the context window is full
    CANCELLED = "cancelled"  # the server gave up on the request (shutdown)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request: exactly one of prompt and messages is set."""

    prompt: str | None
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    session_id: str | None = None  # the KV cache to continue from (the engine's worker)


@dataclass(frozen=True)
class Part:
    """One sequence's share of a batch: `tokens` go into sequence `seq` from position `pos`."""

    seq: int
    pos: int
    tokens: tuple[int, ...] | list[int]
    output: bool  # logits for the last token: something is sampled from it


@dataclass
class GenerationStats:
    """Filled in as a request runs (decoding.py); read by the scheduler when it ends."""

    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0  # already in the KV cache from the previous request
    prompt_tokens_processed: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic()
    last_token_at: float | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_reused: int = 0  # of prompt_tokens, found in the KV cache


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    prompt_ms: float
    time_to_first_token_ms: float
    decode_tokens_per_second: float
    total_ms: float


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of the answer; the last one has finish_reason, usage and timings."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    notice: str = ""  # why the server ended the answer itself, and what to do


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    architecture: str
    quantization: str
    parameter_count: int
    size_bytes: int
    trained_context_length: int
    has_chat_template: bool
    sha256: str = ""


@dataclass(frozen=True)
class RuntimeInfo:
    threads: int
    threads_batch: int
    cpu_features: tuple[str, ...]
    system_info: str
    board: str = ""
    threads_reason: str = ""
    cpu_variant: str = ""
    cpu_variant_reason: str = ""
    cpu_variants_rejected: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingDefaults:
    """A session's defaults for the sampling fields a request leaves unset (None: not set)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Session:
    """A conversation the server keeps. `messages` is empty in listings."""

    id: str
    system_prompt: str
    defaults: SamplingDefaults
    messages: tuple[ChatMessage, ...]
    message_count: int
    dropped_messages: int  # dropped from the start so the conversation fits the context
    created_at: float  # Unix time
    updated_at: float
    title: str = ""  # given, or the start of the first question

    def conversation(self, new: ChatMessage | None = None) -> tuple[ChatMessage, ...]:
        """What the model sees: the system prompt (if any), the history, the new message."""
        system = (ChatMessage("system", self.system_prompt),) if self.system_prompt else ()
        return system + self.messages + ((new,) if new else ())


@dataclass(frozen=True)
class SessionChanges:
    """What UpdateSession (PATCH) changes; None: left as it is."""

    title: str | None = None
    system_prompt: str | None = None
    defaults: SamplingDefaults | None = None


class RequestError(ValueError):
    """A request that cannot be served as asked (INVALID_ARGUMENT); the message names the field."""


class QueueFullError(Exception):
    """The admission queue is full; the caller should retry later."""


class StorageFullError(Exception):
    """The disk holding the sessions is full (RESOURCE_EXHAUSTED): a turn could not be kept."""


class TurnNotKeptError(Exception):
    """A session's answer was cancelled as it finished: not stored (ABORTED)."""


class NotReadyError(Exception):
    """The model is still loading, or the server is shutting down."""


class NotFoundError(LookupError):
    """No such session (NOT_FOUND)."""


class PreconditionError(Exception):
    """The server or the session is not in a state that allows this (FAILED_PRECONDITION)."""


class BusyError(PreconditionError):
    """The session is already answering another message."""


class UnauthenticatedError(Exception):
    """No token, or one the server does not know (UNAUTHENTICATED, HTTP 401)."""
