"""`pllm serve [MODEL]`: the OpenAI-compatible HTTP server.

The host defaults to 127.0.0.1 (vLLM binds 0.0.0.0): a server that anyone on
the network can reach, with no API key, should be something one asks for with
``--host 0.0.0.0``. On SIGTERM or Ctrl+C the server stops accepting
connections, lets in-flight requests finish for up to ``--shutdown-timeout``
seconds, aborts the rest, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pllm.entrypoints.engine_args import EngineArgs

_LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; "
                        "0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("PLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $PLLM_API_KEY; none: no key)")
    g.add_argument("--uvicorn-log-level", default="info", choices=_LOG_LEVELS,
                   help="uvicorn's log level (default info)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run on after SIGTERM before they are "
                        "aborted (default 10)")


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
    except ImportError as exc:
        print(f"pllm serve: {exc}; install the server's dependencies with "
              "`pip install 'pllm[serve]'`", file=sys.stderr)
        return 1
    from pllm.core.engine import LLMEngine

    try:
        engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    except (ValueError, OSError) as exc:
        print(f"pllm serve: error: {exc}", file=sys.stderr)
        return 1
    server: uvicorn.Server | None = None
    app = build_app(engine, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout,
                    should_exit=lambda: server is not None and server.should_exit)
    # The app aborts what is left after --shutdown-timeout; uvicorn's own limit
    # (which cancels connection tasks outright) is only a backstop behind it.
    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.uvicorn_log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    server = uvicorn.Server(config)
    # uvicorn handles SIGINT/SIGTERM itself and, once shut down, re-raises the
    # signal to the handler that was installed before it. A no-op handler there
    # turns a graceful shutdown into exit status 0 instead of death by signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    logging.getLogger(__name__).info("serving %s on http://%s:%d", engine.model_name,
                                     args.host, args.port)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pllm serve")
    add_serve_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
