"""`pllm bench serve --launch ... --launch-command ...`: servers the bench starts
itself, afresh for every rate, here a tiny fake OpenAI server script."""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile

import pytest

from pllm.bench.launch import ServerCommand, pllm_command
from pllm.bench.report import serve_ratios
from pllm.bench.serve import ServeBenchError
from pllm.entrypoints import bench_cmd

FAKE_SERVER = '''
import argparse, json, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--record", required=True)
p.add_argument("--delay", type=float, default=0.002)
p.add_argument("--no-usage", action="store_true")  # as a server that sends no usage chunk
p.add_argument("--die", action="store_true")
p.add_argument("--hang", action="store_true")  # never listens, ignores SIGTERM
args = p.parse_args()
with open(args.record, "a") as f:
    f.write(f"{os.getpid()}\\n")
if args.die:
    print("fake: cannot load the model", flush=True)
    sys.exit(3)
if args.hang:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def _head(self, ctype):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.end_headers()

    def _data(self, obj):
        self.wfile.write(f"data: {json.dumps(obj)}\\n\\n".encode())
        self.wfile.flush()

    def do_GET(self):
        self._head("application/json")
        self.wfile.write(json.dumps({"data": [{"id": "fake-model"}]}).encode())

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._head("text/event-stream")
        for i in range(body["max_tokens"]):
            time.sleep(args.delay)
            self._data({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
        if args.no_usage:  # an empty last chunk, as llama-server sends: no token arrival
            self._data({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        else:
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            self._data({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\\n\\n")


ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
'''

WORKLOAD = ["--num-prompts", "3", "--input-len-range", "4,10", "--output-len-range", "3,5",
            "--max-seconds", "10", "--drain-seconds", "20"]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """``fake(name, *flags)``: a --launch-command for the fake server, which
    appends its pid to tmp_path/NAME.pids at every start."""
    script = tmp_path / "fake.py"
    script.write_text(FAKE_SERVER)
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))  # the launched servers' logs

    def command(name: str, *flags: str) -> str:
        record = tmp_path / f"{name}.pids"
        argv = [sys.executable, str(script), "--record", str(record), *flags]
        return f"{name}={shlex.join(argv)} --port {{port}}"

    return command


def _pids(tmp_path, name: str) -> list[int]:
    return [int(p) for p in (tmp_path / f"{name}.pids").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_each_server_is_started_afresh_for_every_rate(tiny_model_dir, tmp_path, fake, capsys):
    out = tmp_path / "serve.json"
    rc = bench_cmd.main(["serve", "--model", tiny_model_dir, *WORKLOAD,
                         "--launch-command", fake("pllm", "--delay", "0.001"),
                         "--launch-command", fake("llama", "--no-usage", "--delay", "0.003"),
                         "--request-rate", "50", "inf", "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["per_rate"]
    # The servers take turns at each rate.
    assert [(r["server"], r["request_rate"]) for r in rows] == [
        ("pllm", 50.0), ("llama", 50.0), ("pllm", "inf"), ("llama", "inf")]
    assert set(result["servers"]) == {"pllm", "llama"}
    asked = result["workload"]["num_output_tokens"]
    for row in rows:
        assert (row["num_completed"], row["num_failed"], row["num_cancelled"]) == (3, 0, 0)
        assert row["model"] == "fake-model" and row["startup_s"] > 0
        assert row["num_output_tokens"] == asked
        assert row["num_output_tokens_from"] == (
            {"usage": 3} if row["server"] == "pllm" else {"chunks": 3})
        assert row["server_command"].endswith(f"--port {row['port']}")
        assert 0 < row["itl_p50_s"] <= row["itl_p99_s"] and "server_log" not in row
    # A fresh process for every (server, rate), each stopped afterwards; no log left behind.
    pids = _pids(tmp_path, "pllm") + _pids(tmp_path, "llama")
    assert len(set(pids)) == 4 and not any(_alive(p) for p in pids)
    assert not os.listdir(tmp_path / "logs")
    ratios = result["ratios"]
    assert [(r["baseline"], r["request_rate"]) for r in ratios] == [("llama", 50.0),
                                                                    ("llama", "inf")]
    assert ratios == serve_ratios(rows)
    assert ratios[0]["output_tokens_per_s"] == pytest.approx(
        rows[0]["output_tokens_per_s"] / rows[1]["output_tokens_per_s"])
    assert "pllm/server" in printed and "counted from chunks" in printed
    assert os.path.getsize(result["plot"]) > 0


def test_a_server_that_exits_at_once_is_named_with_its_log(tiny_model_dir, tmp_path, fake,
                                                           capsys):
    rc = bench_cmd.main(["serve", "--model", tiny_model_dir, *WORKLOAD, "--no-plot",
                         "--launch-command", fake("broken", "--die"),
                         "--output-json", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "server 'broken' exited with status 3 before it was ready" in err
    assert "fake: cannot load the model" in err and "--die" in err
    assert os.listdir(tmp_path / "logs")  # kept, and named in the message
    assert not (tmp_path / "x.json").exists()


def test_a_server_never_ready_is_killed_after_the_timeout(tiny_model_dir, tmp_path, fake,
                                                          capsys):
    rc = bench_cmd.main(["serve", "--model", tiny_model_dir, *WORKLOAD, "--no-plot",
                         "--launch-command", fake("stuck", "--hang"), "--ready-timeout", "1",
                         "--stop-timeout", "0.5", "--output-json", str(tmp_path / "x.json")])
    assert rc == 2
    assert "server 'stuck' did not answer" in capsys.readouterr().err
    [pid] = _pids(tmp_path, "stuck")
    assert not _alive(pid)  # it ignored SIGTERM: SIGKILL after --stop-timeout


def test_launch_options_and_their_errors(capsys):
    cmd = pllm_command("some/model", None, "--max-num-seqs 4 --enforce-eager")
    assert cmd.name == "pllm" and cmd.argv_for("127.0.0.1", 1234) == [
        sys.executable, "-m", "pllm.entrypoints.cli", "serve", "some/model",
        "--host", "127.0.0.1", "--port", "1234", "--max-num-seqs", "4", "--enforce-eager"]
    assert "--tokenizer" in pllm_command(None, "tok", "").argv
    with pytest.raises(ServeBenchError, match="may not set --port"):
        pllm_command(None, None, "--port=9")
    srv = ServerCommand.parse("llama-server=llama-server -m 'a b.gguf' --port {port} -c 4096")
    assert srv.argv_for("h", 7)[1:5] == ["-m", "a b.gguf", "--port", "7"]
    for bad, message in (("no-command", "is not NAME=COMMAND"),
                         ("x=server --port 8000", "no {port} placeholder"),
                         ("a b=server --port {port}", "server name 'a b'")):
        with pytest.raises(ServeBenchError, match=message):
            ServerCommand.parse(bad)
    for argv, message in ((["--pllm-args", "x y"], "--pllm-args needs --launch pllm"),
                          (["--launch", "pllm", "--base-url", "http://127.0.0.1:1/v1"],
                           "--base-url and --served-model-name are for a running server"),
                          (["--launch", "pllm", "--launch-command", "pllm=s --port {port}"],
                           "share a name")):
        assert bench_cmd.main(["serve", *argv]) == 2
        assert message in capsys.readouterr().err
