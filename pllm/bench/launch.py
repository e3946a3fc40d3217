"""Servers the serving benchmark starts itself: a fresh process for every
(server, rate), on a free loopback port, so that no rate is served from an
earlier one's prefix cache, and every server measured on the same requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from pllm.bench.serve import ServeBenchError, _client, _run_rate, _warmed_up
from pllm.bench.workload import BenchRequest

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServerCommand:
    """A server the bench starts itself: ``argv`` with ``{host}`` and ``{port}``
    placeholders, filled in at every start."""

    name: str
    argv: tuple[str, ...]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[\w.-]+", self.name):
            raise ServeBenchError(
                f"server name {self.name!r} must be letters, digits, '-', '_' or '.'")
        if not any("{port}" in a for a in self.argv):
            raise ServeBenchError(
                f"the command of server {self.name!r} has no {{port}} placeholder: "
                f"{shlex.join(self.argv)!r}; the bench picks a free port for every start")

    @classmethod
    def parse(cls, text: str) -> ServerCommand:
        """``NAME=COMMAND``, the command split as a shell would (no shell runs it)."""
        name, sep, command = text.partition("=")
        if not sep or not command.strip():
            raise ServeBenchError(
                f"--launch-command {text!r} is not NAME=COMMAND, e.g. "
                f"llama-server='llama-server -m model.gguf --host {{host}} --port {{port}}'")
        return cls(name.strip(), tuple(shlex.split(command)))

    def argv_for(self, host: str, port: int) -> list[str]:
        return [a.replace("{host}", host).replace("{port}", str(port)) for a in self.argv]


def pllm_command(model: str | None, tokenizer: str | None, extra_args: str) -> ServerCommand:
    """`pllm serve` from this Python, with the bench's model and tokenizer."""
    extra = shlex.split(extra_args)
    taken = [a for a in extra if a.split("=")[0] in ("--host", "--port")]
    if taken:
        raise ServeBenchError(f"--pllm-args may not set {', '.join(taken)}: the bench sets them")
    argv = [sys.executable, "-m", "pllm.entrypoints.cli", "serve", *([model] if model else []),
            *(["--tokenizer", tokenizer] if tokenizer else []),
            "--host", "{host}", "--port", "{port}", *extra]
    return ServerCommand("pllm", tuple(argv))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LaunchedServer:
    """One start of a ``ServerCommand`` on a free loopback port, in a process
    group of its own (so that stopping it stops its workers too), its output
    in a temporary log file."""

    def __init__(self, command: ServerCommand, host: str = "127.0.0.1") -> None:
        self.name, self.host, self.port = command.name, host, _free_port(host)
        self.argv = command.argv_for(host, self.port)
        self.base_url = f"http://{host}:{self.port}/v1"
        fd, self.log_path = tempfile.mkstemp(prefix=f"pllm-bench-{self.name}-", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            try:
                self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise ServeBenchError(
                    f"cannot start server {self.name!r} ({shlex.join(self.argv)}): {exc}") from None

    async def wait_ready(self, client, timeout_s: float) -> float:
        """Seconds until ``/v1/models`` answered 200; raises if the process ends first."""
        import httpx

        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise self.failure(f"exited with status {self.proc.returncode} before it was ready")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{self.base_url}/models", timeout=5.0)).status_code == 200:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise self.failure(f"did not answer {self.base_url}/models within {timeout_s:g}s "
                                   f"(--ready-timeout)")
            await asyncio.sleep(0.2)

    def stop(self, grace_s: float) -> None:
        """SIGTERM to the group, then SIGKILL after ``grace_s``."""
        if self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # its own group: start_new_session

    def log_tail(self, num_lines: int = 20) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(max(os.path.getsize(self.log_path) - 16384, 0))
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def failure(self, what: str) -> ServeBenchError:
        return ServeBenchError(f"server {self.name!r} {what}\n  command: {shlex.join(self.argv)}"
                               f"\n  last lines of {self.log_path}:\n{self.log_tail()}")


async def _launched_row(client, command: ServerCommand, rate: float,
                        requests: list[BenchRequest], *, ready_timeout_s: float,
                        stop_grace_s: float, **rate_kwargs) -> dict:
    server = LaunchedServer(command)
    logger.info("%s: started for rate %s on port %d (pid %d)", server.name, rate, server.port,
                server.proc.pid)
    try:
        startup_s = await server.wait_ready(client, ready_timeout_s)
        try:
            model = await _warmed_up(client, server.base_url, None, requests)
        except ServeBenchError as exc:
            raise server.failure(f"is ready but unusable: {exc}") from None
        row = await _run_rate(client, f"{server.base_url}/completions", model, requests, rate,
                              **rate_kwargs)
        exited = server.proc.poll()  # before we stop it: it died during the run
    finally:
        server.stop(stop_grace_s)
    row = {"server": server.name, "server_command": shlex.join(server.argv), "port": server.port,
           "model": model, "startup_s": startup_s, **row}
    if row["num_failed"] or exited is not None:  # keep the log for a look
        row.update(server_exit_status=exited, server_log=server.log_path,
                   server_log_tail=server.log_tail())
    else:
        os.unlink(server.log_path)
    return row


async def run_launched_bench(commands: list[ServerCommand], rates: list[float],
                             requests_per_rate: list[list[BenchRequest]], *,
                             ready_timeout_s: float = 600.0, stop_grace_s: float = 15.0,
                             max_seconds: float = 120.0, drain_seconds: float = 60.0,
                             seed: int = 0, api_key: str | None = None) -> dict:
    """One row per (rate, server), each from a fresh process of that server
    (warmed up with one untimed request); at a rate every server gets the same
    requests. The servers take turns at each rate, so that the rows compared
    with each other are measured close together in time."""
    rows = []
    async with _client(api_key) as client:
        for rate, requests in zip(rates, requests_per_rate):
            for command in commands:
                rows.append(await _launched_row(
                    client, command, rate, requests, ready_timeout_s=ready_timeout_s,
                    stop_grace_s=stop_grace_s, max_seconds=max_seconds,
                    drain_seconds=drain_seconds, seed=seed))
    return {"servers": {c.name: list(c.argv) for c in commands}, "per_rate": rows}
