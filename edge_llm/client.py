"""The terminal clients: `edge-llm chat`, `generate`, `info` and `sessions`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from edge_llm.v1 import edge_llm_pb2 as pb
from edge_llm.v1 import edge_llm_pb2_grpc as pb_grpc


def main(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("EDGE_LLM_TOKEN", "")
    with _channel(args) as channel:
        stub = pb_grpc.EdgeLLMStub(grpc.intercept_channel(channel, _Bearer(token)))
        try:
            if args.command == "info":
                return _info(stub, args)
            if args.command == "generate":
                return _generate(stub, args)
            if args.command == "sessions":
                return _sessions(stub, args)
            return _chat(stub, args)
        except grpc.RpcError as e:
            print(f"edge-llm: {_describe(e, args.address)}", file=sys.stderr)
            return 1


def _channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain, or TLS when given a CA to trust or a client certificate."""
    if not (args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)
    files = (args.tls_ca, args.tls_key, args.tls_cert)
    ca, key, cert = (Path(f).read_bytes() if f else None for f in files)
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca, key, cert))


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Every call carries `authorization: Bearer TOKEN` (when there is a token)."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(details), request)


def _describe(e: grpc.RpcError, address: str) -> str:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{details}. Give it with EDGE_LLM_TOKEN=TOKEN (or --token TOKEN)"
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        return f"no edge-llm server at {address} ({details}); start one with `edge-llm serve`"
    if code == grpc.StatusCode.UNAVAILABLE and "Socket closed" in details:
        return f"the server at {address} went away mid-call ({details}); try again"
    return f"{code.name}: {details}"


_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")


def _request(args: argparse.Namespace, messages: list[pb.Message]) -> pb.GenerateRequest:
    req = pb.GenerateRequest(messages=messages, stop=args.stop)
    for name in _SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            setattr(req, name, getattr(args, name))
    return req


def _stream(stub: pb_grpc.EdgeLLMStub, req: pb.GenerateRequest) -> tuple[str, pb.GenerateResponse]:
    """Print the answer as it arrives; return it and the last message. Ctrl-C cancels the call
    (then KeyboardInterrupt): from a signal handler, as grpc advises, not from an exception
    raised somewhere inside grpc's iterator; and even when the parent ignored SIGINT (a
    command started in the background by a script)."""
    call = stub.Generate(req)
    interrupted = False

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        call.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    parts, last = [], pb.GenerateResponse()
    try:
        for msg in call:
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            parts.append(msg.text)
            last = msg
    except grpc.RpcError:
        if not interrupted:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    if last.notice:
        print(f"\n[{last.notice}]", file=sys.stderr)
    return "".join(parts), last


def _generate(stub: pb_grpc.EdgeLLMStub, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw:
        req = _request(args, [])
        req.prompt = text
    else:
        system = [pb.Message(role="system", content=args.system)] if args.system else []
        req = _request(args, [*system, pb.Message(role="user", content=text)])
    _, last = _stream(stub, req)
    print()
    if args.stats:
        t = last.timings
        print(
            f"[{pb.FinishReason.Name(last.finish_reason)}; {last.usage.prompt_tokens} prompt + "
            f"{last.usage.completion_tokens} completion tokens; first token "
            f"{t.time_to_first_token_ms:.0f} ms; {t.decode_tokens_per_second:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def _chat(stub: pb_grpc.EdgeLLMStub, args: argparse.Namespace) -> int:
    """A conversation the server keeps (a session): each turn sends only the new message."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C quits at the prompt
    if args.session:
        session = stub.GetSession(pb.GetSessionRequest(id=args.session)).session
        for m in session.messages:
            print(f"{'> ' if m.role == 'user' else ''}{m.content}")
    else:
        defaults = pb.SamplingDefaults(stop=args.stop)
        for name in _SAMPLING_FLAGS:
            if getattr(args, name) is not None:
                setattr(defaults, name, getattr(args, name))
        session = stub.CreateSession(
            pb.CreateSessionRequest(system_prompt=args.system or "", defaults=defaults)
        ).session
    print(
        f"edge-llm chat: session {session.id} (resume it with --session {session.id}). "
        "Ctrl-C stops an answer; Ctrl-D (or Ctrl-C at the prompt) quits.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        req = _request(args, [pb.Message(role="user", content=line)])
        req.session_id = session.id
        try:
            _stream(stub, req)
        except KeyboardInterrupt:
            print("\n[stopped: this turn is not kept]", file=sys.stderr)
            continue
        except grpc.RpcError as e:
            print(f"\nedge-llm: {_describe(e, args.address)}", file=sys.stderr)
            continue
        print()


def _sessions(stub: pb_grpc.EdgeLLMStub, args: argparse.Namespace) -> int:
    if args.action == "list":
        token = ""
        while True:
            page = stub.ListSessions(pb.ListSessionsRequest(page_size=100, page_token=token))
            for s in page.sessions:
                if args.json:
                    print(json_format.MessageToJson(s, indent=None))
                    continue
                when = s.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
                print(f"{s.id}  {when}  {s.message_count:4d} messages  {s.system_prompt[:40]!r}")
            token = page.next_page_token
            if not token:
                return 0
    for session_id in args.ids:
        if args.action == "rm":
            stub.DeleteSession(pb.DeleteSessionRequest(id=session_id))
            print(f"deleted {session_id}", file=sys.stderr)
            continue
        session = stub.GetSession(pb.GetSessionRequest(id=session_id)).session
        if args.json:
            print(json_format.MessageToJson(session))
            continue
        if session.system_prompt:
            print(f"[system] {session.system_prompt}")
        if session.dropped_messages:
            print(f"[{session.dropped_messages} older messages dropped to fit the context]")
        for m in session.messages:
            print(f"[{m.role}] {m.content}")
    return 0


def _info(stub: pb_grpc.EdgeLLMStub, args: argparse.Namespace) -> int:
    info = stub.GetInfo(pb.GetInfoRequest())
    if args.json:
        print(json_format.MessageToJson(info))
        return 0
    m, r, lim = info.model, info.runtime, info.limits
    print(
        f"model    {m.name} ({m.architecture}, {m.quantization}, "
        f"{m.parameter_count / 1e6:.0f}M parameters, {m.size_bytes / 1e6:.0f} MB)"
    )
    print(f"file     {m.path}")
    print(f"sha256   {m.sha256 or '(still hashing)'}")
    print(
        f"runtime  edge-llm {r.edge_llm_version}, llama-cpp-python {r.llama_cpp_python_version}, "
        f"grpcio {r.grpcio_version}, Python {r.python_version}"
    )
    print(f"threads  {r.threads} generation, {r.threads_batch} prompt")
    print(f"cpu      {' '.join(r.cpu_features)}")
    print(f"backend  {r.cpu_variant} ({r.cpu_variant_reason})")
    for variant, cause in sorted(r.cpu_variants_rejected.items()):
        print(f"rejected {variant}: {cause}")
    print(
        f"limits   context {lim.context_length} tokens (model trained on "
        f"{m.trained_context_length}), max_tokens {lim.max_tokens} (default "
        f"{lim.default_max_tokens}), {lim.parallel} at once, queue {lim.queue_depth}"
    )
    return 0
