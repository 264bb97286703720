"""One Config, built once: command-line flags > EDGE_LLM_* environment > TOML file > defaults."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_FILE = Path("/etc/edge-llm/config.toml")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names it."""


@dataclass(frozen=True)
class Config:
    # A GGUF path, or the name of a model edge-llm knows how to fetch ("default", "tiny").
    model: str = "default"
    host: str = "127.0.0.1"
    port: int = 50051
    # The chat page, the OpenAI-style API, /health and /metrics: "host:port" (port 0 picks a
    # free one); "" turns the HTTP side off.
    http_listen: str = "127.0.0.1:8080"
    # Context window (prompt + answer) of each request; 0: the most the memory plan allows, up
    # to 8192 (memory.AUTO_CONTEXT).
    context_length: int = 0
    # 0: pick from the CPUs this process may use.
    threads: int = 0
    threads_batch: int = 0
    # The ggml CPU backend variant ("haswell", "zen4", ...); auto: the best this CPU can run.
    cpu_variant: str = "auto"
    # Prompt tokens processed per llama_decode call; also the granularity of cancellation
    # during prompt processing.
    batch_size: int = 256
    # Requests that decode at once, in one batch; 0: the memory plan chooses (up to 4).
    parallel: int = 0
    # Requests that may wait while `parallel` run; one more gets RESOURCE_EXHAUSTED.
    queue_depth: int = 8
    # MiB the service plans to stay within; 0: the tightest of 2 GiB, the cgroup limit,
    # physical memory less room for the system, and the memory available at start-up.
    memory_budget_mb: int = 0
    max_tokens: int = 2048  # the cap a request may ask for
    default_max_tokens: int = 512  # when a request does not say
    # On SIGTERM or SIGINT: seconds the requests already accepted get to finish; the rest are
    # then cut off with a final message saying so. systemd's TimeoutStopSec must be longer.
    drain_seconds: int = 30
    log_level: str = "info"
    # Sessions: SQLite and spilled KV caches live here; "" = $STATE_DIRECTORY (systemd), else
    # $XDG_STATE_HOME/edge-llm (~/.local/state/edge-llm).
    state_dir: str = ""
    max_sessions: int = 1000  # more: the least recently used are removed
    # Per client (a token's name; without tokens all are one): sessions it may keep (its own
    # least recently used make room for more) and requests it may have waiting.
    client_max_sessions: int = 250
    client_queue_depth: int = 4
    session_idle_hours: int = 168  # unused this long: removed; 0 = never
    # MiB of saved KV caches kept in memory (part of the memory plan); sessions' beyond go to disk.
    session_cache_mb: int = 128
    # MiB of saved session KV caches kept on disk beyond that (the least recently used go);
    # 0: a quarter of the free space in state_dir at start-up, at most 2048.
    session_disk_mb: int = 0
    # A conversation that no longer fits the context: "drop_oldest" turns, or "refuse".
    context_overflow: str = "drop_oldest"
    # Put prompt text in the logs (debugging only: prompts are the users' words).
    log_prompts: bool = False
    # A file of "NAME TOKEN" lines (mode 0600): every call but health then needs one of the
    # tokens (gRPC metadata / HTTP header `authorization: Bearer TOKEN`); made, with a token
    # of its own, if it does not exist. Re-read on SIGHUP.
    auth_tokens: str = ""
    # Server reflection (grpcurl list/describe: the API's shape, no data) without a token.
    public_reflection: bool = False
    # TLS on both ports (PEM files), re-read on SIGHUP; with a client CA every connection must
    # show a certificate it signed (mTLS), whose subject then names the caller.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Listen on a non-loopback address without tokens, on purpose (a network of one's own).
    insecure: bool = False

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "queue_depth",
            "max_tokens",
            "max_sessions",
            "client_max_sessions",
            "client_queue_depth",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "context_length",
            "parallel",
            "threads",
            "threads_batch",
            "memory_budget_mb",
            "drain_seconds",
            "session_idle_hours",
            "session_cache_mb",
            "session_disk_mb",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = automatic), got {getattr(self, name)}")
        if not 0 < self.default_max_tokens <= self.max_tokens:
            raise ConfigError(
                f"default_max_tokens must be in 1..max_tokens ({self.max_tokens}), "
                f"got {self.default_max_tokens}"
            )
        if self.parallel > self.batch_size:
            raise ConfigError(
                f"parallel ({self.parallel}) must be at most batch_size ({self.batch_size}): "
                "each running request puts a token in every batch"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535 (0 picks a free port), got {self.port}")
        self.http_address  # noqa: B018 (checked now, not at start-up)
        if self.context_overflow not in ("drop_oldest", "refuse"):
            raise ConfigError(
                f"context_overflow must be drop_oldest or refuse, got {self.context_overflow!r}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key too")
        exposed = self.exposed
        if exposed and not (self.auth_tokens or self.tls_client_ca) and not self.insecure:
            raise ConfigError(
                f"listening on {' and '.join(exposed)} without tokens would let anyone on the "
                "network read, change and delete every conversation: add --auth-tokens FILE "
                "(auth_tokens; a missing FILE is made with a new token; with --tls-cert and "
                "--tls-key they do not cross the network in clear) or client certificates "
                "(--tls-client-ca), or --insecure (insecure = true) to allow it on purpose, or "
                "listen on 127.0.0.1"
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"log_level must be debug, info, warning or error, got {self.log_level}"
            )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def http_address(self) -> tuple[str, int] | None:
        """http_listen as (host, port); None when the HTTP side is off."""
        if not self.http_listen:
            return None
        host, sep, port = self.http_listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(
                f"http_listen must be host:port (e.g. 127.0.0.1:8080, [::]:8080, 0.0.0.0:0 for "
                f"a free port) or empty to turn HTTP off; got {self.http_listen!r}"
            )
        return host, int(port)

    @property
    def exposed(self) -> list[str]:
        """The listening addresses beyond this machine (not loopback)."""
        found = [] if is_loopback(self.host) else [self.address]
        http = self.http_address
        if http is not None and not is_loopback(http[0]):
            found.append(self.http_listen)
        return found

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(name: str, kind: type, value: Any, source: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() not in _BOOLS:
            raise ConfigError(f"{name} in {source} must be true or false, got {value!r}")
        return _BOOLS[str(value).lower()]
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} in {source} must be an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} in {source} must be an integer, got {value!r}") from None
    return str(value)


def _types() -> dict[str, type]:
    kinds = {"int": int, "bool": bool}
    return {f.name: kinds.get(str(f.type), str) for f in fields(Config)}


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Merge the sources; `flags` holds only the options given on the command line."""
    env = os.environ if env is None else env
    types = _types()
    values: dict[str, Any] = {}

    path = config_file or (Path(env["EDGE_LLM_CONFIG"]) if env.get("EDGE_LLM_CONFIG") else None)
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) in {path}: {', '.join(unknown)}; known: {', '.join(types)}"
            )
        values.update({k: _coerce(k, types[k], v, str(path)) for k, v in data.items()})

    for name, kind in types.items():
        key = f"EDGE_LLM_{name.upper()}"
        # Set but empty counts for text settings ("" turns HTTP off), not for numbers.
        if env.get(key) or (key in env and kind is str):
            values[name] = _coerce(name, kind, env[key], key)

    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, types[name], value, f"--{name.replace('_', '-')}")

    return Config(**values)
