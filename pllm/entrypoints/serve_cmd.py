"""`pllm serve [MODEL]`: the OpenAI-compatible HTTP server.

The host defaults to 127.0.0.1 (vLLM binds 0.0.0.0): a server that anyone on
the network can reach, with no API key, should be something one asks for with
``--host 0.0.0.0``. On SIGTERM or Ctrl+C the server stops accepting
connections, lets in-flight requests finish for up to ``--shutdown-timeout``
seconds, aborts the rest, and exits 0.

The port is bound before the model loads, so that a port in use (or one that
cannot be bound) is reported at once, not after a minute of loading; clients
that connect meanwhile wait in the listen backlog until the server is up.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from pllm.entrypoints.engine_args import EngineArgs, positive_int
from pllm.entrypoints.openai.tool_parsers import TOOL_PARSERS

# Streams should not freeze while long prompts are prefilled: while requests
# decode, a server's steps aim at this many ms (--target-itl-ms; 0: off).
SERVE_TARGET_ITL_MS = 800.0
_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {value}")
    return value


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; "
                        "0.0.0.0 for every interface)")
    g.add_argument("--port", type=_port, default=8000,
                   help="port to listen on (default 8000; 0: any free port)")
    g.add_argument("--api-key", default=os.environ.get("PLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $PLLM_API_KEY; none: no key)")
    g.add_argument("--uvicorn-log-level", default="info", choices=_LOG_LEVELS,
                   help="uvicorn's log level (default info)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run on after SIGTERM before they are "
                        "aborted (default 10)")
    g.add_argument("--max-request-body-bytes", type=positive_int, default=8 << 20,
                   help="largest request body accepted; a larger one gets HTTP 413 "
                        "(default 8388608, 8 MiB)")
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool calls are read out of the model's text for tool_choice "
                        "auto: hermes (<tool_call>{...}</tool_call>, Hermes/Qwen templates) "
                        "or llama3_json ({\"name\": ..., \"parameters\": ...}, Llama 3.1+)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='let requests with tools use tool_choice "auto" (the default when '
                        "tools are given); needs --tool-call-parser")
    g.add_argument("--max-waiting-requests", type=positive_int, default=None,
                   help="most requests waiting for the engine; beyond that new ones get "
                        "HTTP 503 with Retry-After (default: no limit)")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API "
                    "(/v1/completions, /v1/chat/completions, /v1/models, /metrics, ...).",
    )
    add_serve_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from pllm.entrypoints.openai.api_server import build_app
        from pllm.entrypoints.openai.async_engine import EngineThread
    except ImportError as exc:
        print(f"pllm serve: {exc}; install the server's dependencies with "
              "`pip install 'pllm[serve]'`", file=sys.stderr)
        return 1
    from pllm.core.engine import LLMEngine

    if args.enable_auto_tool_choice and not args.tool_call_parser:
        print("pllm serve: error: --enable-auto-tool-choice needs --tool-call-parser "
              f"({', '.join(sorted(TOOL_PARSERS))})", file=sys.stderr)
        return 1
    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.target_itl_ms is None:
        engine_args.target_itl_ms = SERVE_TARGET_ITL_MS
    try:
        engine_config = engine_args.create_engine_config()
        sock = _listen(args.host, args.port)
    except ValueError as exc:
        print(f"pllm serve: error: {exc}", file=sys.stderr)
        return 1
    with sock:
        # Built on the thread that will run its loop (AsyncLLMEngine's docstring
        # says why); but Ray's driver starts on the main thread, where it sets up
        # its cleanup (started elsewhere it left its agents running after the
        # server had exited).
        on_ray = engine_config.parallel.distributed_executor_backend == "ray"
        engine_thread = None if on_ray else EngineThread()
        try:
            engine = (LLMEngine(engine_config) if engine_thread is None
                      else engine_thread.call(LLMEngine, engine_config))
        except (ValueError, OSError) as exc:
            print(f"pllm serve: error: {exc}", file=sys.stderr)
            return 1
        server: uvicorn.Server | None = None
        app = build_app(engine, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout,
                        should_exit=lambda: server is not None and server.should_exit,
                        max_request_body_bytes=args.max_request_body_bytes,
                        max_waiting_requests=args.max_waiting_requests,
                        tool_call_parser=args.tool_call_parser,
                        enable_auto_tool_choice=args.enable_auto_tool_choice,
                        engine_thread=engine_thread)
        # The app aborts what is left after --shutdown-timeout; uvicorn's own limit
        # (which cancels connection tasks outright) is only a backstop behind it.
        config = uvicorn.Config(app, log_level=args.uvicorn_log_level,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5)
        server = uvicorn.Server(config)
        # uvicorn handles SIGINT/SIGTERM itself and, once shut down, re-raises the
        # signal to the handler that was installed before it. A no-op handler there
        # turns a graceful shutdown into exit status 0 instead of death by signal.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        logging.getLogger(__name__).info("serving %s on http://%s", engine.model_name,
                                         _address(args.host, sock.getsockname()[1]))
        server.run(sockets=[sock])
    return 0 if server.started else 1


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, as uvicorn would open it (with
    SO_REUSEADDR: a server restarted at once gets its port back); raises
    ValueError saying why it cannot (in use, no such address, ...)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ValueError(f"cannot listen on {_address(host, port)}: "
                         f"{reason[:1].lower()}{reason[1:]}") from None
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pllm serve")
    add_serve_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
