"""The HTTP layer alone, on a real uvicorn server on 127.0.0.1 in this
process, in front of a scripted engine: what a connection sees after an
unexpected error, the body limit, and the admission bound."""

from __future__ import annotations

import http.client
import json
import threading
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from server_utils import ScriptedEngine, free_port  # noqa: E402


class _Tokenizer:
    def encode(self, text, add_special_tokens=True):
        if text == "explode":
            raise RuntimeError("the tokenizer blew up")
        return [ord(c) % 200 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)

    def get_vocab(self):
        return {chr(97 + i): i for i in range(26)}

    def __len__(self):
        return 256


class _Engine(ScriptedEngine):
    """The scripted engine with what the HTTP layer reads: a name, a context,
    a tokenizer, tokenize and render_chat; a step takes 20 ms."""

    def __init__(self) -> None:
        super().__init__(step_delay=0.02)
        self.tokenizer = _Tokenizer()
        self.model_name = "scripted"
        self.max_model_len = 512
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=8))

    def tokenize(self, text, add_special_tokens=True):
        return self.tokenizer.encode(text)

    def render_chat(self, messages, add_generation_prompt=True):
        text = "".join(m["content"] for m in messages)
        return text, self.tokenizer.encode(text)


@pytest.fixture
def serve():
    """``serve(**build_app_kwargs)`` -> the base URL of a running server."""
    from pllm.entrypoints.openai.api_server import build_app

    servers = []

    def start(**kwargs) -> str:
        port = free_port()
        app = build_app(_Engine(), **kwargs)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"127.0.0.1:{port}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


def _post(conn: http.client.HTTPConnection, path: str, body: dict) -> tuple[int, dict, dict]:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def test_an_unexpected_error_is_a_500_and_the_connection_stays_usable(serve):
    host = serve()
    conn = http.client.HTTPConnection(host, timeout=30)
    status, _, body = _post(conn, "/v1/completions", {"prompt": "explode", "max_tokens": 2})
    assert status == 500
    assert body["error"]["code"] == 500 and "blew up" in body["error"]["message"]
    # The same keep-alive connection serves the next request.
    status, _, body = _post(conn, "/v1/completions", {"prompt": "fine", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["text"] == "xx"
    conn.close()


def test_a_body_over_the_limit_is_a_413(serve):
    host = serve(max_request_body_bytes=1000)
    r = httpx.post(f"http://{host}/v1/completions", json={"prompt": "x" * 2000})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    # Without Content-Length (chunked): counted as it arrives.
    chunks = (b'{"prompt": "' + b"x" * 500 + b'"' for _ in range(4))
    r = httpx.post(f"http://{host}/v1/completions", content=chunks,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(f"http://{host}/v1/completions",
                      json={"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_beyond_max_waiting_requests_new_ones_get_503_with_retry_after(serve):
    host = serve(max_waiting_requests=2)
    url = f"http://{host}/v1/completions"
    long = {"prompt": "wait", "max_tokens": 150, "stream": True}
    with httpx.Client(timeout=30) as client:
        streams = [client.stream("POST", url, json=long) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        assert [r.status_code for r in responses] == [200, 200], [r.read() for r in responses]
        time.sleep(0.2)  # a step has counted them
        r = client.post(url, json={"prompt": "one more", "max_tokens": 1})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == 503
        r = client.post(f"http://{host}/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert r.status_code == 503
        for s in streams:
            s.__exit__(None, None, None)  # disconnect: aborted, the queue empties
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = client.post(url, json={"prompt": "now", "max_tokens": 1})
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200


def test_a_request_the_engine_fails_alone_errors_alone(serve):
    host = serve()
    url = f"http://{host}/v1/completions"
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json={"prompt": "by", "max_tokens": 40,
                                              "stream": True}) as bystander:
            r = client.post(url, json={"prompt": ScriptedEngine.FAILING_PROMPT, "max_tokens": 5})
            assert r.status_code == 500 and "sampling failed" in r.json()["error"]["message"]
            with client.stream("POST", url, json={"prompt": ScriptedEngine.FAILING_PROMPT,
                                                  "max_tokens": 5, "stream": True}) as failing:
                lines = [line for line in failing.iter_lines() if line]
            assert '"code": 500' in lines[-2] and lines[-1] == "data: [DONE]"
            events = [line for line in bystander.iter_lines() if line.startswith("data: {")]
        assert '"finish_reason":"length"' in events[-1]
        assert sum(len(json.loads(e[6:])["choices"][0]["text"]) for e in events) == 40
