"""Start and stop a real `pllm serve` process for the server tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """`pllm serve` when the console script has the subcommand, else the module."""
    exe = shutil.which("pllm") or os.path.join(os.path.dirname(sys.executable), "pllm")
    if os.path.exists(exe):
        probe = subprocess.run([exe, "serve", "--help"], capture_output=True, timeout=120)
        if probe.returncode == 0:
            return [exe, "serve"]
    return [sys.executable, "-m", "pllm.entrypoints.serve_cmd"]


class ServerProcess:
    def __init__(self, args: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="pllm-serve-", suffix=".log", delete=False)
        cmd = serve_command() + args + ["--host", "127.0.0.1", "--port", str(self.port),
                                        "--uvicorn-log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def log_tail(self, num_chars: int = 4000) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()[-num_chars:]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pllm serve exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"pllm serve not healthy after {timeout}s:\n{self.log_tail()}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def cleanup(self) -> None:
        self._log.close()
        os.unlink(self._log.name)
