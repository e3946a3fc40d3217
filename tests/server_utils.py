"""Start and stop a real `pllm serve` process for the server tests."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def running_server(args: list[str], timeout: float = 300):
    """A `pllm serve` started with ``args`` and healthy; stopped (and its
    clean exit checked) afterwards."""
    proc = ServerProcess(args)
    try:
        proc.wait_ready(timeout=timeout)
        yield proc
        assert proc.terminate(timeout=60) == 0, proc.log_tail()
    finally:
        proc.kill()
        proc.cleanup()


class ScriptedEngine:
    """LLMEngine's contract in miniature, for the async engine and the HTTP
    layer without a model: one token (id 7, text "x") per step for every
    request until its max_tokens. A request whose prompt is ``[66, 6]`` fails
    on its own at its first step (an output with ``error``, as the engine
    reports a per-request failure); ``fail_next_step`` fails a whole step."""

    FAILING_PROMPT = [66, 6]

    def __init__(self, step_delay: float = 0.002) -> None:
        self.requests: dict[str, tuple[list[int], object, list[int]]] = {}
        self.aborted: list[str] = []
        self.fail_next_step = False
        self.step_delay = step_delay
        self.shut_down = False

    def add_request(self, request_id, prompt, params) -> None:
        if not prompt:
            raise ValueError("prompt must not be empty")
        ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        self.requests[request_id] = (list(ids) if isinstance(ids, list) else [1, 2], params, [])

    def abort_request(self, request_ids) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.requests.pop(rid, None)
            self.aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        self.shut_down = True

    def get_stats(self):
        from types import SimpleNamespace

        return SimpleNamespace(num_running=0, num_waiting=len(self.requests), kv_cache_usage=0.0,
                               num_free_blocks=8, num_total_blocks=8, prefix_cache_queries=0,
                               prefix_cache_hits=0, num_preemptions=0)

    def step(self):
        from pllm.core.outputs import CompletionOutput, RequestOutput

        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outputs = []
        for rid, (prompt, params, tokens) in list(self.requests.items()):
            failing = prompt == self.FAILING_PROMPT
            tokens.append(7)
            done = failing or len(tokens) >= params.max_tokens
            reason = "abort" if failing else "length" if done else None
            comp = CompletionOutput(0, "x" * len(tokens), list(tokens), None, None, reason)
            outputs.append(RequestOutput(rid, None, prompt, None, [comp], done,
                                         error="sampling failed: boom" if failing else None))
            if done:
                del self.requests[rid]
        return outputs


def metric(server: ServerProcess, name: str) -> float:
    """One gauge or counter of ``server``'s /metrics (its one label set)."""
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
