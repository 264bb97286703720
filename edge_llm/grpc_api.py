"""The gRPC skin: protobuf in, protobuf out, over the appliance (appliance.py).

A Generate call is converted and admitted on its own handler thread; its chunks go out one
message per chunk. The RPC-done callback cancels the generation, whether the client
cancelled, went away or passed its deadline (grpcio's context.is_active() is not reliable for
that: grpc #20259).

Every handler is wrapped by @_rpc: domain errors become gRPC statuses there and only there,
and the appliance counts the call while it runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from edge_llm import auth, checks, convert
from edge_llm.appliance import Appliance
from edge_llm.types import (
    GenerateRequest,
    NotFoundError,
    NotReadyError,
    PreconditionError,
    QueueFullError,
    RequestError,
    SamplingDefaults,
    StorageFullError,
    TurnNotKeptError,
    UnauthenticatedError,
)
from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Handler = TypeVar("Handler", bound=Callable[..., Any])

# Domain errors and the gRPC status each one is; anything else is INTERNAL.
_STATUS: dict[type[Exception], grpc.StatusCode] = {
    RequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StorageFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReadyError: grpc.StatusCode.UNAVAILABLE,
    TurnNotKeptError: grpc.StatusCode.ABORTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
}


@contextlib.contextmanager
def _statuses(context: grpc.ServicerContext) -> Iterator[None]:
    """End the call with the status of the domain error raised inside, or INTERNAL."""
    try:
        yield
    except tuple(_STATUS) as e:
        code = next(code for kind, code in _STATUS.items() if isinstance(e, kind))
        context.abort(code, str(e))
    except Exception as e:
        log.exception("request handling failed")
        context.abort(grpc.StatusCode.INTERNAL, f"could not process the request: {e}")


_METHODS = pb.DESCRIPTOR.services_by_name["EdgeLLM"].methods_by_name


def add_to_server(service: EdgeLLMService, server: grpc.Server) -> None:
    """Register the servicer, its requests handed over as bytes: @_rpc parses them, so one
    that does not parse (invalid UTF-8 in a string, a truncated field) is INVALID_ARGUMENT
    with the reason, where grpc's own parsing would answer INTERNAL."""
    handlers = {}
    for name, method in _METHODS.items():
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[name] = make(getattr(service, name), response_serializer=_serialize)
    service_name = pb.DESCRIPTOR.services_by_name["EdgeLLM"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _parsed(method: str, request: Any) -> Any:
    """The request message (add_to_server hands over bytes; a test may pass a message)."""
    if not isinstance(request, bytes):
        return request
    kind = getattr(pb, _METHODS[method].input_type.name)
    try:
        return kind.FromString(request)
    except DecodeError as e:
        raise RequestError(
            f"the request is not a valid {kind.DESCRIPTOR.full_name} ({e}); is the client's "
            "copy of edge_llm.proto this server's?"
        ) from None


def authenticate(tokens: auth.Tokens | None, context: grpc.ServicerContext) -> auth.Caller:
    """The caller: a token's name; else a verified client certificate's subject (mTLS)."""
    metadata = dict(context.invocation_metadata())
    subject = context.auth_context().get("x509_subject")
    return auth.identify(
        tokens, auth.bearer(metadata.get("authorization")), subject[0].decode() if subject else None
    )


def authenticated(tokens: auth.Tokens | None, context: grpc.ServicerContext) -> auth.Caller:
    """authenticate() for a servicer outside @_rpc (reflection): ends the call if it fails."""
    with _statuses(context):
        return authenticate(tokens, context)
    raise AssertionError("unreachable: _statuses aborted the call")


def _rpc(handler: Handler) -> Handler:
    """A servicer method: counted while it runs, its errors turned into statuses."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streaming(self: EdgeLLMService, request: Any, context: grpc.ServicerContext) -> Any:
            with self.core.call(context.add_callback), _statuses(context):
                self.caller(context)
                yield from handler(self, _parsed(handler.__name__, request), context)

        return streaming  # type: ignore[return-value]

    @functools.wraps(handler)
    def unary(self: EdgeLLMService, request: Any, context: grpc.ServicerContext) -> Any:
        with self.core.call(context.add_callback), _statuses(context):
            self.caller(context)
            return handler(self, _parsed(handler.__name__, request), context)

    return unary  # type: ignore[return-value]


class EdgeLLMService(pb_grpc.EdgeLLMServicer):
    """The gRPC skin over the appliance: protobuf in, protobuf out."""

    def __init__(self, core: Appliance, tokens: auth.Tokens | None = None) -> None:
        self.core = core
        self.tokens = tokens

    def caller(self, context: grpc.ServicerContext) -> auth.Caller:
        """Who calls, by the token in its metadata; UNAUTHENTICATED without a good one."""
        return authenticate(self.tokens, context)

    def owner(self, context: grpc.ServicerContext) -> str:
        """Whose sessions the call may see: the caller's name ("" without tokens)."""
        return self.caller(context).name

    @_rpc
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        session_id = checks.session_id(request.session_id) if request.session_id else None

        def build(defaults: SamplingDefaults | None) -> GenerateRequest:
            return convert.generate_request_from_pb(request, self.core.limits, defaults)

        generation = self.core.generate(
            "grpc",
            build,
            session_id,
            context.peer(),
            request.replace_last,
            owner=self.owner(context),
        )
        # The RPC-done callback: the client cancelled, went away or passed its deadline.
        if not context.add_callback(generation.cancel):
            generation.cancel()
            return  # the call ended while we were tokenizing
        for chunk in generation.chunks():
            yield convert.chunk_to_pb(chunk)

    @_rpc
    def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.ServicerContext
    ) -> pb.CreateSessionResponse:
        limits = self.core.limits
        system_prompt = checks.size("system_prompt", request.system_prompt, limits.max_text_bytes)
        title = checks.size("title", request.title, checks.MAX_TITLE_BYTES)
        defaults = convert.sampling_defaults_from_pb(request.defaults, limits)
        session = self.core.create_session(
            system_prompt, defaults, title, owner=self.owner(context)
        )
        return pb.CreateSessionResponse(session=convert.session_to_pb(session))

    @_rpc
    def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: grpc.ServicerContext
    ) -> pb.UpdateSessionResponse:
        session_id = checks.session_id(request.id, "id")
        changes = convert.session_changes_from_pb(request, self.core.limits)
        session = self.core.update_session(session_id, changes, owner=self.owner(context))
        return pb.UpdateSessionResponse(session=convert.session_to_pb(session))

    @_rpc
    def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.ServicerContext
    ) -> pb.GetSessionResponse:
        session_id = checks.session_id(request.id, "id")
        session = self.core.get_session(session_id, owner=self.owner(context))
        return pb.GetSessionResponse(session=convert.session_to_pb(session))

    @_rpc
    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        page_size = checks.page_size(request.page_size)
        sessions, token = self.core.list_sessions(
            page_size, request.page_token, owner=self.owner(context)
        )
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_pb(s) for s in sessions], next_page_token=token
        )

    @_rpc
    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        session_id = checks.session_id(request.id, "id")
        self.core.delete_session(session_id, owner=self.owner(context))
        return pb.DeleteSessionResponse()

    @_rpc
    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        text, messages = convert.tokenize_request_from_pb(request, self.core.limits)
        tokens = self.core.tokenize(text, messages)
        return pb.TokenizeResponse(tokens=tokens, count=len(tokens))

    @_rpc
    def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetInfoResponse:
        loaded = self.core.ready()
        return convert.info_to_pb(loaded.model, loaded.runtime, self.core.limits, loaded.memory)
