"""`pllm serve`'s refusals of what cannot work: at parsing, or with the port
taken before any model loads; each is one line on stderr, no traceback."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest

from pllm.entrypoints.serve_cmd import add_serve_args


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pllm.entrypoints.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120)


def parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pllm serve")
    add_serve_args(parser)
    return parser.parse_args(args)


@pytest.mark.parametrize("flag, value, reason", [
    ("--port", "99999", "must be 0 to 65535, got 99999"),
    ("--port", "-1", "must be 0 to 65535, got -1"),
    ("--num-threads", "-3", "must be >= 1, got -3"),
    ("--max-num-seqs", "0", "must be >= 1, got 0"),
    ("--kv-cache-memory", "lots", "'lots' is not a size like 2GiB or 512MB"),
    ("--kv-cache-memory", "inf", "'inf' is not a size like 2GiB or 512MB"),
    ("--kv-cache-memory", "0GiB", "must be more than 0 bytes, got '0GiB'"),
    ("--max-request-body-bytes", "0", "must be >= 1, got 0"),
    ("--max-waiting-requests", "0", "must be >= 1, got 0"),
    ("--tool-call-parser", "mistral",
     "invalid choice: 'mistral' (choose from 'hermes', 'llama3_json')"),
])
def test_bad_values_are_refused_when_parsing(capsys, flag, value, reason):
    with pytest.raises(SystemExit) as exc:
        parse(flag, value)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"pllm serve: error: argument {flag}: {reason}"


def test_server_limits_parse():
    from pllm.entrypoints.openai.api_server import DEFAULT_MAX_REQUEST_BODY_BYTES

    args = parse()
    assert args.max_request_body_bytes == DEFAULT_MAX_REQUEST_BODY_BYTES  # the app's own default
    assert (args.max_waiting_requests, args.port) == (None, 8000)
    args = parse("--max-request-body-bytes", "1024", "--max-waiting-requests", "5", "--port", "0",
                 "--kv-cache-memory", "512MB")
    assert (args.max_request_body_bytes, args.max_waiting_requests, args.port) == (1024, 5, 0)
    assert args.kv_cache_memory == "512MB"  # kept as typed


def test_port_in_use_fails_before_the_model_loads(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = serve(tiny_model_dir, "--host", "127.0.0.1", "--port", str(port))
    assert res.returncode != 0
    # The only line: no model-loading log came before it.
    assert res.stderr == f"pllm serve: error: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_kv_cache_memory_beyond_the_host_is_refused(tiny_model_dir):
    res = serve(tiny_model_dir, "--host", "127.0.0.1", "--port", "0", "--kv-cache-memory", "100000GiB")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    last = res.stderr.splitlines()[-1]
    assert last.startswith("pllm serve: error: --kv-cache-memory 100000.00 GiB is more than the ")
    assert "of RAM available on this host" in last


def test_auto_tool_choice_needs_a_parser(tiny_model_dir):
    res = serve(tiny_model_dir, "--port", "0", "--enable-auto-tool-choice")
    assert res.returncode != 0
    assert res.stderr == ("pllm serve: error: --enable-auto-tool-choice needs --tool-call-parser "
                          "(hermes, llama3_json)\n")
