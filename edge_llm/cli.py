"""`edge-llm`: the command line. Parsing only; the work is in server, client and models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_llm import __version__, auth, models, tls
from edge_llm.config import Config, ConfigError, load_config

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _serve_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str
) -> None:
    p = sub.add_parser(
        name,
        help=help,
        description=f"{help[0].upper()}{help[1:]}. Settings: flags > EDGE_LLM_* environment "
        "(e.g. EDGE_LLM_PORT) > the TOML file (--config, EDGE_LLM_CONFIG, or "
        "/etc/edge-llm/config.toml) > defaults.",
    )
    p.add_argument("--config", type=Path, help="TOML config file")
    d = Config()
    p.add_argument(
        "--model",
        help=f"GGUF path, or a known model: {', '.join(models.KNOWN_MODELS)} (default: {d.model})",
    )
    p.add_argument("--host", help=f"address to listen on (default: {d.host})")
    p.add_argument("--port", type=int, help=f"gRPC port (default: {d.port}; 0 picks a free one)")
    p.add_argument(
        "--http-listen",
        help=f"host:port of the chat page and the OpenAI-style API (default: {d.http_listen}; "
        '"" turns HTTP off)',
    )
    p.add_argument(
        "--context-length",
        type=int,
        help="tokens per request, prompt + answer "
        "(default: 0 = the most the memory plan allows, up to 8192)",
    )
    p.add_argument("--threads", type=int, help="generation threads (default: 0 = usable CPUs)")
    p.add_argument("--threads-batch", type=int, help="prompt threads (default: 0 = usable CPUs)")
    p.add_argument(
        "--cpu-variant",
        help="ggml CPU backend variant, e.g. haswell (default: auto, "
        "the best this CPU can run; `edge-llm doctor` lists them)",
    )
    p.add_argument("--batch-size", type=int, help=f"prompt batch (default: {d.batch_size})")
    p.add_argument(
        "--parallel",
        type=int,
        help="requests that decode at once (default: 0 = the memory plan chooses, up to 4)",
    )
    p.add_argument(
        "--queue-depth", type=int, help=f"requests that may wait (default: {d.queue_depth})"
    )
    p.add_argument(
        "--max-tokens", type=int, help=f"cap on a request's max_tokens (default: {d.max_tokens})"
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        help=f"max_tokens when a request does not set it (default: {d.default_max_tokens})",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=int,
        help="memory to plan for (default: 0 = the "
        "tightest of 2 GiB, the cgroup limit and physical memory)",
    )
    p.add_argument(
        "--drain-seconds",
        type=int,
        help="on SIGTERM/SIGINT, how long accepted "
        f"requests may take to finish (default: {d.drain_seconds})",
    )
    p.add_argument(
        "--state-dir",
        help="where sessions are kept (default: $STATE_DIRECTORY, else ~/.local/state/edge-llm)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--log-prompts",
        action="store_true",
        default=None,
        help="put prompt text in the logs (debugging only)",
    )
    p.add_argument(
        "--auth-tokens",
        help='file of "NAME TOKEN" lines, mode 0600: calls need one of the tokens '
        "(made with a new token if missing; re-read on SIGHUP)",
    )
    p.add_argument(
        "--public-reflection",
        action="store_true",
        default=None,
        help="server reflection without a token",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address without tokens, on purpose",
    )
    p.add_argument("--tls-cert", help="TLS certificate (PEM) for gRPC and HTTP; with --tls-key")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument(
        "--tls-client-ca",
        help="require client certificates signed by this CA (PEM); their subject names the caller",
    )
    if name == "doctor":
        p.add_argument("--json", action="store_true", help="machine-readable report")
        p.add_argument(
            "--board",
            metavar="DIR",
            type=Path,
            help="report for the board whose files scripts/record-board copied to DIR (of "
            "this machine's architecture: the CPU variant is still tried on this CPU)",
        )


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"default: {DEFAULT_ADDRESS}")
    p.add_argument(
        "--token",
        help="the server's token (default: $EDGE_LLM_TOKEN; better there: a flag shows in ps)",
    )
    p.add_argument("--tls-ca", help="TLS: trust the server's certificate from this CA (PEM)")
    p.add_argument("--tls-cert", help="TLS: this client's certificate (PEM), for mTLS")
    p.add_argument("--tls-key", help="TLS: its private key (PEM)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-llm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-llm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub, "serve", "serve a GGUF model over gRPC")
    _serve_parser(sub, "doctor", "report the board, and what serve would choose on it and why")

    p = sub.add_parser("fetch-model", help="download, assemble and verify a known model")
    p.add_argument(
        "name",
        nargs="?",
        choices=list(models.KNOWN_MODELS),
        help="the model to fetch (default: the one the configuration names)",
    )
    p.add_argument("--print-path", action="store_true", help="print only the path on stdout")

    p = sub.add_parser("chat", help="talk to a server interactively (Ctrl-C stops an answer)")
    p.add_argument("--session", help="resume this session (its id)")
    _client_args(p)
    _sampling_args(p)

    p = sub.add_parser("sessions", help="the conversations a server keeps")
    p.add_argument("action", choices=("list", "show", "rm"))
    p.add_argument("ids", nargs="*", metavar="ID", help="sessions to show or remove")
    p.add_argument("--json", action="store_true")
    _client_args(p)

    p = sub.add_parser("generate", help="one answer, streamed to stdout (for scripts)")
    p.add_argument("prompt", help="the user message ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="send as a raw prompt, no chat template")
    p.add_argument("--stats", action="store_true", help="print usage and timings on stderr")
    _client_args(p)
    _sampling_args(p)

    p = sub.add_parser("info", help="describe the server's model, runtime and limits")
    p.add_argument("--json", action="store_true")
    _client_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("serve", "doctor"):
            return _serve(args)
        if args.command == "fetch-model":
            return _fetch_model(args.name, args.print_path)
        if args.command == "sessions" and args.action != "list" and not args.ids:
            print(
                f"edge-llm: sessions {args.action} needs at least one session id", file=sys.stderr
            )
            return 2
        from edge_llm import client

        return client.main(args)
    except (ConfigError, auth.AuthError, tls.TlsError, models.ModelError, OSError) as e:
        print(f"edge-llm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _fetch_model(name: str | None, print_path: bool) -> int:
    if name is None:  # what `serve` would load: config file, then EDGE_LLM_MODEL
        name = load_config().model
        if name not in models.KNOWN_MODELS:
            print(f"the configured model is a file, nothing to fetch: {name}", file=sys.stderr)
            if print_path:
                print(name)
            return 0
    path = models.fetch(name)
    if print_path:
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    skip = ("command", "config", "json", "board")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    config = load_config(flags, config_file=args.config)
    if args.command == "doctor":
        from edge_llm import doctor

        return doctor.main(config, args.json, args.board)
    from edge_llm import logs, server

    logs.setup(config.log_level)

    return server.run(config)
