"""Start-up, the main loop and shutdown.

Order matters: the gRPC port opens first with health NOT_SERVING (so a supervisor or a probe
can watch the load), then the model loads, a warm-up generation runs through the real path,
and only then does health turn SERVING and systemd hear READY=1.

Stopping (SIGTERM, or SIGINT at a shell) drains: health turns NOT_SERVING, new calls are
refused with UNAVAILABLE, the requests already accepted get `drain_seconds` to finish, and
whatever is still running then ends with a last message saying the server cut it off; then
the port closes. A second signal cuts off at once.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio.to_thread
import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from edge_llm import auth, backend, faults, grpc_api, hardware, logs, memory, models, sessions, tls
from edge_llm.admission import Scheduler
from edge_llm.appliance import TOKENIZERS, Appliance, Loaded
from edge_llm.checks import Limits
from edge_llm.config import Config, is_loopback
from edge_llm.conversations import Conversations
from edge_llm.decoding import Job
from edge_llm.engine import Engine, EngineSettings, cpu_features_used, read_shape, system_info
from edge_llm.grpc_api import EdgeLLMService, authenticated
from edge_llm.http_api import build_app
from edge_llm.kvstates import KVStates
from edge_llm.systemd import Notifier, Watchdog
from edge_llm.types import GenerateRequest, ModelInfo, RuntimeInfo, Sampling
from edge_llm.v1 import edge_llm_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EdgeLLM"].full_name  # "edge_llm.v1.EdgeLLM"
_SPARE_HANDLER_THREADS = 8  # GetInfo, sessions, and refusing calls beyond the bounds
_REFLECTION_STREAMS = 4  # each holds a handler thread while it is open, idle or not
# Health checks have threads of their own: no other call can keep a probe waiting.
_HEALTH_THREADS = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health")
# Bounds on the steps of a stop, each ended early by what it waits for: the worker leaving the
# engine once its job is cancelled (one token or prompt batch), then the cut-off streams'
# last messages going out (their handler threads may be slow to run on a busy board).
_WORKER_STOP_SECONDS = 3.0
_FLUSH_SECONDS = 10.0


class Server:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.model_path = models.resolve(config.model)
        models.check_gguf(self.model_path, config.model)  # fail before opening the port
        self.state_dir = sessions.usable_state_directory(config.state_dir)  # this too
        self.limits = Limits(
            context_length=config.context_length or memory.AUTO_CONTEXT,  # planned in load()
            max_tokens=config.max_tokens,
            default_max_tokens=config.default_max_tokens,
            queue_depth=config.queue_depth,
        )
        self.core = Appliance(self.limits, config.log_prompts)
        self.tokens = auth.Tokens(Path(config.auth_tokens)) if config.auth_tokens else None
        self.tls = None
        if config.tls_cert:
            ca = Path(config.tls_client_ca) if config.tls_client_ca else None
            self.tls = tls.Tls(tls.TlsFiles(Path(config.tls_cert), Path(config.tls_key), ca))
        self.service = EdgeLLMService(self.core, self.tokens)
        self.health = _Health()
        self.serving = False  # health's overall status, for HTTP's /health
        self.port = 0
        self.http_port = 0
        self._grpc: grpc.Server | None = None
        self._http: _HttpServer | None = None
        self._scheduler: Scheduler | None = None
        self._engine: Engine | None = None
        self._watchdog: Watchdog | None = None
        self._stopping = False
        self._loading = False  # load() is running (on the loader thread)
        self._hurry = threading.Event()  # a second signal: cut off now, no more draining
        self.load_error: Exception | None = None

    def start(self) -> int:
        """Open the port with health NOT_SERVING; return the port (config.port 0 picks one)."""
        # A handler thread per call that waits: every Generate the queue holds and every one
        # running (the plan chooses how many once the model is read: at most MAX_PARALLEL
        # unless configured), every tokenization running or in line, every reflection stream,
        # and some spare. Each of these is bounded, and refused beyond its bound; a call that
        # finds every thread busy waits its turn. Health checks run on threads of their own.
        queue, parallel = self.config.queue_depth, self.config.parallel or memory.MAX_PARALLEL
        generations = queue + parallel
        workers = generations + (TOKENIZERS + queue) + _REFLECTION_STREAMS + _SPARE_HANDLER_THREADS
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", self.limits.max_request_bytes)],
        )
        grpc_api.add_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        tokens = None if self.config.public_reflection else self.tokens
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            _Reflection(names, _REFLECTION_STREAMS, tokens), server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.tls is None:
            self.port = server.add_insecure_port(self.config.address)
        else:
            self.port = server.add_secure_port(self.config.address, self.tls.grpc_credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.address}: in use, or not a local address")
        server.start()
        self._grpc = server
        if (http := self.config.http_address) is not None:
            app = build_app(self.core, lambda: self.serving, is_loopback(http[0]), self.tokens)
            self._http = _HttpServer(app, *http, workers, self.tls)
            self.http_port = self._http.port
            log.info(
                "HTTP on %s:%d: the chat page, the OpenAI-style API under /v1, /health",
                http[0],
                self.http_port,
            )
        log.info(
            "listening on %s:%d (health NOT_SERVING while the model loads)",
            self.config.host,
            self.port,
        )
        scheme = "with TLS" if self.tls else "without TLS"
        for address in self.config.exposed:
            if self.tokens is None and self.config.tls_client_ca == "":  # insecure = true
                log.warning("insecure: anyone who reaches %s may use every session", address)
            elif self.tls is None:
                log.warning(
                    "%s without TLS: tokens and answers cross the network in clear; "
                    "add --tls-cert and --tls-key",
                    address,
                )
        log.info(
            "gRPC and HTTP %s%s",
            scheme,
            ", client certificates required" if self.config.tls_client_ca else "",
        )
        if self.tokens is not None:
            log.info("tokens from %s: %s", self.tokens.path, ", ".join(self.tokens.names))
            if self.tokens.made is not None:
                self._show_made_token(self.tokens.made)
        return self.port

    def _show_made_token(self, token: str) -> None:
        """A token this start generated, shown once, on stdout rather than in the log (as
        Jupyter does): the one way for the person who started the server to learn it. Not
        where stdout is the journal, which would keep it for anyone who reads the logs."""
        assert self.tokens is not None
        if logs.is_journal(sys.stdout):
            log.warning(
                "made a token in %s; it is not shown in the journal: sudo cat %s",
                self.tokens.path,
                self.tokens.path,
            )
            return
        where = None
        if self._http and (http := self.config.http_address):
            host = "127.0.0.1" if http[0] in ("0.0.0.0", "::", "") else http[0]
            host = f"[{host}]" if ":" in host else host
            where = f"{'https' if self.tls else 'http'}://{host}:{self.http_port}/"
        lines = [
            f"edge-llm made a token, kept in {self.tokens.path} (name {auth.GENERATED_NAME!r}).",
            *([f"Open the chat page with it:  {where}#token={token}"] if where else []),
            f"API clients send it as the header or metadata  authorization: Bearer {token}",
        ]
        print("\n".join(lines), flush=True)

    def reload(self) -> None:
        """SIGHUP: re-read the tokens and the TLS files."""
        if self.tokens is None and self.tls is None:
            log.info("SIGHUP: nothing to re-read (no auth_tokens, no TLS)")
        if self.tokens is not None:
            self.tokens.reload()
        if self.tls is not None:
            self.tls.reload()

    def load(self) -> None:
        """Load the model, warm it up, start taking requests; health turns SERVING."""
        self._loading = True
        try:
            self._load()
        finally:
            self._loading = False

    def _load(self) -> None:
        plan = plan_resources(self.config, self.model_path)
        self._say_plan(plan)
        self.limits = replace(
            self.limits, context_length=plan.memory.context_length, parallel=plan.memory.parallel
        )
        self.core.limits = self.limits
        engine = self._engine = self._read_model(plan.settings, plan.cpu.variant)
        settings = plan.settings
        kv = KVStates(
            engine,
            settings.sequences,
            settings.context_length,
            self.state_dir / "kv",
            plan.memory.sessions,
            self.config.session_disk_mb * memory.MIB or None,
        )
        scheduler = self._scheduler = Scheduler(
            faults.engine(engine),
            kv,
            plan.memory.parallel,
            self.config.queue_depth,
            settings.batch_size,
            self.config.client_queue_depth,
        )
        scheduler.start()
        conversations = self._open_sessions(engine, kv, plan.settings.context_length)
        runtime = _runtime_info(plan)
        _warm_up(engine, scheduler)
        kv.clear()
        self.core.loaded = Loaded(
            engine, scheduler, runtime, engine.info, plan.memory, conversations
        )
        threading.Thread(target=self._hash_model, name="model-sha256", daemon=True).start()
        if not self._stopping:  # else a signal came during the load
            self._serve(engine.info)

    def _say_plan(self, plan: ResourcePlan) -> None:
        if plan.memory.shrunk and self.config.context_length:
            log.warning(
                "context %d tokens does not fit the memory budget or the model's trained context: "
                "using %d",
                plan.memory.requested_context,
                plan.memory.context_length,
            )
        log.info("cpu backend: %s (%s)", plan.cpu.variant, plan.cpu.why)
        for variant, cause in plan.cpu.rejected.items():
            log.warning("cpu backend: %s is not used: its self-test failed (%s)", variant, cause)
        s = plan.settings
        log.info(
            "board: %s; threads: %d generation, %d prompt (%s)",
            plan.board.model,
            s.threads,
            s.threads_batch,
            plan.threads_why,
        )
        log.info("memory plan: %s", plan.memory.describe())

    def _read_model(self, settings: EngineSettings, cpu_variant: str) -> Engine:
        log.info("loading %s", self.model_path)
        self.notifier.status(
            f"loading {self.model_path.name} (cpu {cpu_variant}, {settings.threads}/"
            f"{settings.threads_batch} threads, context {settings.context_length})"
        )
        return Engine(self.model_path, settings)

    def _open_sessions(self, engine: Engine, kv: KVStates, context_length: int) -> Conversations:
        store = sessions.SessionStore(
            self.state_dir / "sessions.sqlite3",
            self.config.max_sessions,
            self.config.session_idle_hours * 3600,
            make_room=kv.free_disk,
            max_per_owner=self.config.client_max_sessions,
        )
        for removed in store.expire():
            kv.forget(removed)
        log.info("sessions in %s", store.path)
        return Conversations(
            store,
            context_length,
            drop_oldest=self.config.context_overflow == "drop_oldest",
            tokenize=engine.tokenize,
            has_chat_template=engine.info.has_chat_template,
            forget=kv.forget,
        )

    def _serve(self, model: ModelInfo) -> None:
        """Health SERVING, READY=1 for systemd, and the watchdog from now on."""
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "ready: %s, %s, %s parameters",
            model.name,
            model.quantization,
            f"{model.parameter_count:,}",
        )
        self.notifier.ready(self.status())
        assert self._scheduler is not None
        self._watchdog = Watchdog(
            self.notifier, self._scheduler.stalled_for, self.status, self._worker_stalled
        )
        self._watchdog.start()

    def _worker_stalled(self, stalled: bool) -> None:
        status = health_pb2.HealthCheckResponse
        self._set_health(status.NOT_SERVING if stalled else status.SERVING)

    def status(self) -> str:
        """One line for `systemctl status`: what is served, how, and how it is going."""
        loaded, scheduler = self.core.loaded, self._scheduler
        if loaded is None or scheduler is None:
            return "loading"
        r = loaded.runtime
        recent = [j.stats for j in list(scheduler.recent)[-8:] if j.stats.completion_tokens > 1]
        tokens = sum(s.completion_tokens - 1 for s in recent)
        seconds = sum((s.last_token_at or 0) - (s.first_token_at or 0) for s in recent)
        speed = f"{tokens / seconds:.1f} tokens/s recently" if seconds > 0 else "no answers yet"
        running = len(scheduler.running)
        return (
            f"serving {loaded.model.name} on {self.config.host}:{self.port}; cpu {r.cpu_variant}, "
            f"{r.threads}/{r.threads_batch} threads; served {scheduler.served}, {speed}; "
            f"{running} running, {scheduler.waiting} waiting"
        )

    def _hash_model(self) -> None:
        sha = models.sha256_file(self.model_path)
        self.core.set_model_sha256(sha)
        log.info("model SHA-256 %s", sha)

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING and not self._stopping
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def stop(self, drain: float | None = None) -> None:
        """Drain (`drain` seconds, default config.drain_seconds), cut off the rest, stop."""
        drain = self.config.drain_seconds if drain is None else drain
        self._stopping = True
        scheduler = self._scheduler
        # New calls get UNAVAILABLE (HTTP 503) from here on, while the port stays open: probes
        # see NOT_SERVING (clients balancing on it move away) and accepted requests finish.
        self.core.draining = True
        # NOT_SERVING for "" and the service, pushed to Watch streams; later set()s are ignored.
        self.health.enter_graceful_shutdown()
        self.serving = False
        busy = 0 if scheduler is None else scheduler.waiting + len(scheduler.running)
        self.notifier.stopping(
            f"stopping: {busy} requests get up to {drain:g} s to finish",
            drain + _WORKER_STOP_SECONDS + 3 * _FLUSH_SECONDS + 5,  # the steps after the drain
        )
        log.info("stopping: %d requests get up to %g s to finish", busy, drain)
        engine_free = True
        if scheduler is not None:
            self._drain(scheduler, drain)
            if self._watchdog is not None:
                self._watchdog.stop()  # the worker is about to end: not a stall
            engine_free = scheduler.close(
                notice=f"the server is shutting down and cut this answer off after a {drain:g} s "
                "grace period; send the request again (to another server, or once it is back)",
                timeout=_WORKER_STOP_SECONDS,
            )
            self.core.wait_for_calls(_FLUSH_SECONDS)  # cut-off streams' last messages
        if self._grpc is not None:
            self._grpc.stop(None).wait()  # what is left: health Watch streams, probes
        if self._http is not None:
            self._http.stop(_FLUSH_SECONDS)
        if self._loading:  # the loader thread is using the model: the exit frees it
            log.info("stopped during the model load")
            return
        # stop() cancels calls without waiting for their handlers to leave the model (a large
        # Tokenize) or the store (a commit): free them only once none is inside.
        if not self.core.wait_for_calls(_FLUSH_SECONDS):
            log.error("calls are still running; exiting without freeing the model")
            return
        if self.core.loaded is not None:
            self.core.loaded.conversations.store.close()
        if self._engine is not None and engine_free:
            self._engine.close()
        elif not engine_free:  # freeing the model under a running llama_decode would crash
            log.error("the inference worker did not stop; exiting without freeing the model")
        log.info("stopped")

    def _drain(self, scheduler: Scheduler, seconds: float) -> None:
        """Let accepted requests finish, for up to `seconds` or until hurry(); the first
        drain() call refuses new ones."""
        deadline = time.monotonic() + seconds
        while not scheduler.drain(min(0.5, max(0.0, deadline - time.monotonic()))):
            if self._hurry.is_set() or time.monotonic() >= deadline:
                left = scheduler.waiting + len(scheduler.running)
                log.warning("stopping: cutting off %d unfinished requests", left)
                return

    def hurry(self) -> None:
        """Stop draining: cut off what is still running now."""
        self._hurry.set()


@dataclass(frozen=True)
class ResourcePlan:
    """What the service decides about the board before it loads the model (also `doctor`)."""

    board: hardware.Board
    cpu: backend.CpuBackend
    settings: EngineSettings
    threads_why: str
    memory: memory.MemoryPlan


def plan_resources(
    config: Config, model_path: Path, board: hardware.Board | None = None
) -> ResourcePlan:
    """CPU variant and threads from the board (this one unless given), the context from the
    memory budget.

    Configured values win. Loads the CPU backend (llama.cpp can read no model before that): the
    best variant that passes a self-test on this model's weight types.
    """
    cpu = backend.load(config.cpu_variant, model_path)
    board = board or hardware.detect()
    threads = hardware.plan_threads(board)
    limit = memory.budget(board.mem_limit, board.mem_total, board.mem_available)
    if config.memory_budget_mb:
        limit = memory.Budget(config.memory_budget_mb * memory.MIB, "memory_budget_mb")
    plan = memory.plan(
        read_shape(model_path),
        config.context_length or memory.AUTO_CONTEXT,
        config.batch_size,
        limit.bytes,
        parallel=config.parallel,
        answer_tokens=config.default_max_tokens,
        sessions_bytes=config.session_cache_mb * memory.MIB,
        budget_why=limit.why,
    )
    settings = EngineSettings(
        context_length=plan.context_length,
        batch_size=config.batch_size,
        threads=config.threads or threads.generation,
        threads_batch=config.threads_batch or threads.prompt,
        sequences=plan.parallel,
    )
    why = "configured" if config.threads or config.threads_batch else threads.why
    return ResourcePlan(board, cpu, settings, why, plan)


def _runtime_info(plan: ResourcePlan) -> RuntimeInfo:
    info = system_info()
    return RuntimeInfo(
        threads=plan.settings.threads,
        threads_batch=plan.settings.threads_batch,
        cpu_features=cpu_features_used(info),
        system_info=info,
        board=plan.board.model,
        threads_reason=plan.threads_why,
        cpu_variant=plan.cpu.variant,
        cpu_variant_reason=plan.cpu.why,
        cpu_variants_rejected=plan.cpu.rejected,
        versions={
            "llama_cpp_python": version("llama-cpp-python"),
            "grpcio": grpc.__version__,
            "protobuf": version("protobuf"),
            "python": platform.python_version(),
        },
    )


def _warm_up(engine: Engine, scheduler: Scheduler) -> None:
    """One short generation through the scheduler: pages the weights in, proves the path."""
    request = GenerateRequest(
        prompt="Hello", messages=(), max_tokens=2, sampling=Sampling(temperature=0)
    )
    job = Job(request, engine.prompt_tokens(request), peer="warm-up")
    scheduler.submit(job)
    for _ in job.chunks():
        pass
    scheduler.recent.clear()  # the warm-up is not a request served
    scheduler.served = 0


class _HttpServer:
    """uvicorn on an event loop of its own, in a thread: the port is bound here, so a port in
    use fails the start like gRPC's, and port 0 is known at once."""

    def __init__(
        self, app: Any, host: str, port: int, threads: int, secure: tls.Tls | None
    ) -> None:
        self._threads = threads
        try:
            self._socket = socket.create_server(
                (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
            )
        except OSError as e:
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {e.strerror}") from None
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # our logging, set up by the CLI
            access_log=False,
            lifespan="off",
            ws_max_size=1024 * 1024,
            timeout_graceful_shutdown=int(_FLUSH_SECONDS),
            server_header=False,
            **{"ws": "websockets-sansio", **(secure.http_options() if secure else {})},
        )
        self._server = uvicorn.Server(config)
        # Its start and stop lines repeat ours, under the name "uvicorn.error": keep its
        # warnings and errors only.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        # Each HTTP request waiting on the appliance (queued, tokenizing, reading chunks) holds
        # a worker thread: as many as gRPC's handler threads, and spare for the rest.
        anyio.to_thread.current_default_thread_limiter().total_tokens = self._threads
        await self._server.serve(sockets=[self._socket])

    def stop(self, timeout: float) -> None:
        self._server.should_exit = True
        self._thread.join(timeout + 1)
        self._socket.close()


class _Health(health.HealthServicer):
    """The standard health service, its Check on threads no other call can take."""

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        return super().Check(request, context)

    Check.experimental_thread_pool = _HEALTH_THREADS  # type: ignore[attr-defined]


class _Reflection(reflection.ReflectionServicer):
    """Server reflection (grpcurl's list and describe), a few streams at once: an open
    stream holds a handler thread even while idle, and idle ones must not take them all."""

    def __init__(
        self, service_names: tuple[str, ...], streams: int, tokens: auth.Tokens | None
    ) -> None:
        super().__init__(service_names)
        self._streams = streams
        self._open = threading.BoundedSemaphore(streams)
        self._tokens = tokens

    def ServerReflectionInfo(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        authenticated(self._tokens, context)
        if not self._open.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._streams} reflection streams are open, the most there may be; "
                "close one and retry",
            )
        try:
            yield from super().ServerReflectionInfo(request_iterator, context)
        finally:
            self._open.release()


def run(config: Config) -> int:
    """`edge-llm serve`: run until SIGTERM or SIGINT; return the exit status."""
    server = Server(config)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():
            name = signal.Signals(signum).name
            log.warning("%s again: cutting off the requests still running", name)
            server.hurry()
            return
        log.info("%s: stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: server.reload())
    server.start()
    # Load on another thread: the main thread must stay free to run signal handlers, so that
    # SIGTERM during a long load stops the service at once.
    loader = threading.Thread(target=_load_or_stop, args=(server, stopping), daemon=True)
    loader.start()
    # Wake up now and then: Python runs signal handlers on the main thread only, and a signal
    # the kernel hands to one of gRPC's or llama.cpp's threads does not interrupt a wait here.
    while not stopping.wait(0.25):
        pass
    server.stop()
    return 0 if server.load_error is None else 1


def _load_or_stop(server: Server, stopping: threading.Event) -> None:
    try:
        server.load()
    except Exception as e:
        if stopping.is_set():  # a signal during the load refuses its warm-up: not a failure
            log.info("stopped during the load (%s)", e)
            return
        server.load_error = e
        log.error("%s", e)
        stopping.set()
