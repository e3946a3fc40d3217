"""The OpenAI-compatible server, end to end: one real `pllm serve` process with the
default model, driven by the official openai client and plain HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_utils import ScriptedEngine, ServerProcess  # noqa: E402

slow = pytest.mark.slow  # the tests that talk to the real server

API_KEY = "test-key"
MAX_MODEL_LEN = 2048
ENGINE_KW = {"max_model_len": MAX_MODEL_LEN, "kv_cache_memory": "256MB"}
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MB",
               "--api-key", API_KEY]
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is 2+2? Answer briefly."}]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def server():
    proc = ServerProcess(SERVER_ARGS)
    try:
        proc.wait_ready(timeout=600)
        yield proc
        # Graceful shutdown: a stream in flight at SIGTERM still runs to its end.
        received: list[str] = []
        started = threading.Event()

        def consume() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 12, "stream": True,
                    "temperature": 0, "ignore_eos": True}
            with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, headers=AUTH,
                              timeout=120) as r:
                for line in r.iter_lines():
                    started.set()
                    received.append(line)

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(120)
        returncode = proc.terminate(timeout=120)
        reader.join(120)
        assert returncode == 0, proc.log_tail()
        assert "data: [DONE]" in received and '"finish_reason":"length"' in "".join(received)
    finally:
        proc.kill()
        proc.cleanup()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def model_name(client):
    return client.models.list().data[0].id


def _metrics(server) -> dict[str, float]:
    """Every sample of /metrics, keyed by name and labels (less model_name)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                              if k not in ("model_name", "le"))
            if "le" in s.labels:
                continue
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def _wait_until(predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


# ---------------------------------------------------------------- basics


@slow
def test_health_version_models_openapi(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    models = client.models.list().data
    assert len(models) == 1 and models[0].id
    assert client.models.retrieve(models[0].id).id == models[0].id
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


@slow
def test_tokenize_detokenize(server, model_name):
    r = httpx.post(f"{server.url}/tokenize", json={"model": model_name, "prompt": PROMPTS[0]},
                   headers=AUTH)
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) > 0
    assert body["max_model_len"] == MAX_MODEL_LEN
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": body["tokens"]}, headers=AUTH)
    assert r.json()["prompt"] == PROMPTS[0]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}, headers=AUTH)
    assert r.status_code == 200 and r.json()["count"] > 5
    # With an API key set, these need it too.
    _assert_error(httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}), 401)
    _assert_error(httpx.post(f"{server.url}/detokenize", json={"tokens": [1]}), 401)


# ---------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def offline_greedy():
    """Greedy outputs of the offline LLM for the same prompts (one load, then freed)."""
    from pllm import SamplingParams
    from pllm.entrypoints.llm import LLM

    llm = LLM(**ENGINE_KW)
    params = SamplingParams(temperature=0, max_tokens=12)
    completions = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    chat = llm.chat(CHAT, params, use_tqdm=False)[0].outputs[0].text
    del llm
    return completions, chat


@slow
def test_greedy_matches_offline_llm(client, model_name, offline_greedy):
    completions, chat = offline_greedy
    for prompt, expected in zip(PROMPTS, completions):
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=12,
                                      temperature=0)
        assert r.choices[0].text == expected
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=12,
                                       temperature=0)
    assert r.choices[0].message.content == chat
    assert r.choices[0].message.role == "assistant"


# ---------------------------------------------------------------- completions


@slow
def test_completion_prompt_forms_n_and_usage(server, client, model_name):
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]},
                        headers=AUTH).json()["tokens"]
    r = client.completions.create(model=model_name, prompt=PROMPTS, n=2, max_tokens=4,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    assert r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    by_text = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=4,
                                        temperature=0)
    by_ids = client.completions.create(model=model_name, prompt=tokens, max_tokens=4,
                                       temperature=0)
    by_id_lists = client.completions.create(model=model_name, prompt=[tokens, tokens],
                                            max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == r.choices[0].text
    assert [c.text for c in by_id_lists.choices] == [by_text.choices[0].text] * 2
    assert by_ids.usage.prompt_tokens == len(tokens)
    assert by_text.usage.completion_tokens == 4 and by_text.choices[0].finish_reason == "length"


@slow
def test_completion_logprobs_echo_stop_seed(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=6,
                                  temperature=0, logprobs=3)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4 and top[chosen] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy took the best one

    echoed = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=6,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + text

    stop_at = text.strip()[:3]
    stopped = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=6,
                                        temperature=0, stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_at not in stopped.choices[0].text and text.startswith(stopped.choices[0].text)

    kw = dict(model=model_name, prompt=PROMPTS[1], max_tokens=6, temperature=1.0, seed=1234,
              top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5)
    first = client.completions.create(**kw)
    assert client.completions.create(**kw).choices[0].text == first.choices[0].text


@slow
def test_completion_stream_matches_non_stream(client, model_name):
    full = client.completions.create(model=model_name, prompt=PROMPTS[1], max_tokens=8,
                                     temperature=0)
    chunks = list(client.completions.create(
        model=model_name, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


# ---------------------------------------------------------------- chat


@slow
def test_chat_logprobs_and_max_completion_tokens(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0,
                                       max_completion_tokens=5, logprobs=True, top_logprobs=2,
                                       user="someone")
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.usage.completion_tokens <= 5
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode() == t.token


@slow
def test_chat_stream_n2(client, model_name):
    full = client.chat.completions.create(model=model_name, messages=CHAT, temperature=0,
                                          max_tokens=8)
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in client.chat.completions.create(model=model_name, messages=CHAT, temperature=0,
                                                max_tokens=8, n=2, stream=True,
                                                stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts[0] == texts[1] == full.choices[0].message.content
    assert reasons == {0: full.choices[0].finish_reason, 1: full.choices[0].finish_reason}
    assert usage.completion_tokens == 2 * full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


# ---------------------------------------------------------------- load


@slow
def test_16_concurrent_requests(server, model_name):
    async def run() -> list:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY,
                                     max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(
                aclient.completions.create(model=model_name, prompt=f"Fact number {i}:",
                                           max_tokens=8, temperature=0)
                for i in range(16)))
        finally:
            await aclient.close()

    results = asyncio.run(run())
    assert len(results) == 16
    for r in results:
        assert 1 <= r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop",
                                                                                     "length")
    running = _wait_until(lambda: _metrics(server)[
        "pllm:num_requests_running{}"] == 0, timeout=30)
    assert running


# ---------------------------------------------------------------- errors


def _assert_error(response: httpx.Response, status: int, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param


@slow
def test_errors_have_openai_shape_and_do_not_disturb_running(server, client, model_name):
    url = f"{server.url}/v1/completions"
    expected = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=16,
                                         temperature=0).choices[0].text
    # A stream in flight while bad requests arrive must come out unchanged.
    stream = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=16,
                                       temperature=0, stream=True)
    first = next(iter(stream))

    def post(body, headers=AUTH, path=url):
        return httpx.post(path, json=body, headers=headers, timeout=60)

    ok = {"model": model_name, "prompt": "hi", "max_tokens": 2}
    _assert_error(post({**ok, "temperature": -1}), 400, "temperature")
    _assert_error(post({**ok, "n": 0}), 400, "n")
    _assert_error(post({**ok, "n": 100000}), 400, "n")
    _assert_error(post({**ok, "max_tokens": "many"}), 400, "max_tokens")
    _assert_error(post({**ok, "logprobs": 50}), 400, "logprobs")
    _assert_error(post({"model": model_name}), 400, "prompt")
    _assert_error(post({**ok, "prompt": ""}), 400, "prompt")
    _assert_error(post({**ok, "prompt": [1] * MAX_MODEL_LEN}), 400, "prompt")
    too_long = post({**ok, "prompt": [1] * (MAX_MODEL_LEN - 10), "max_tokens": 11})
    _assert_error(too_long, 400, "prompt")
    assert "maximum context length" in too_long.json()["error"]["message"]
    _assert_error(post({**ok, "prompt": [10**9]}), 400, "prompt")
    _assert_error(post({**ok, "model": "no-such-model"}), 404, "model")
    _assert_error(post(ok, headers={}), 401)
    _assert_error(post(ok, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(httpx.post(url, content=b"{not json", headers=AUTH), 400)
    chat_url = f"{server.url}/v1/chat/completions"
    _assert_error(post({"model": model_name, "messages": []}, path=chat_url), 400, "messages")
    _assert_error(post({"messages": CHAT, "top_logprobs": 2}, path=chat_url), 400, "top_logprobs")
    long_chat = [{"role": "user", "content": "word " * MAX_MODEL_LEN}]
    _assert_error(post({"messages": long_chat, "max_tokens": 2}, path=chat_url), 400, "messages")

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="hi", max_tokens=2, top_p=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0).models.list()

    text = first.choices[0].text + "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected
    again = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=16,
                                      temperature=0)
    assert again.choices[0].text == expected


@slow
def test_a_bystander_streams_on_through_bad_requests(server, client, model_name):
    """Requests that used to pass validation and then fail the whole batch
    (ending every other client's stream), bodies that froze the event loop,
    and text no tokenizer takes: each is refused alone, while a stream in
    flight goes on to the same tokens and /health keeps answering."""
    url = f"{server.url}/v1/completions"
    body = {"model": model_name, "prompt": PROMPTS[1], "max_tokens": 120, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    expected = client.completions.create(**body).choices[0].text
    stream = client.completions.create(**body, stream=True)
    text = next(iter(stream)).choices[0].text

    def post(payload, path=url, **kw):
        return httpx.post(path, headers={**AUTH, **kw.pop("headers", {})}, timeout=60,
                          **({"content": payload} if isinstance(payload, (bytes, str))
                             else {"json": payload}), **kw)

    ok = {"model": model_name, "prompt": "hi", "max_tokens": 2}
    _assert_error(post(b'{"prompt": "hi", "max_tokens": 2, "top_k": 1e23}',
                       headers={"Content-Type": "application/json"}), 400, "top_k")
    _assert_error(post({**ok, "seed": 2**64}), 400, "seed")
    chat_url = f"{server.url}/v1/chat/completions"
    _assert_error(post({"messages": CHAT, "max_tokens": 2, "seed": 2**64}, path=chat_url),
                  400, "seed")
    _assert_error(post({**ok, "stop_token_ids": [10**9], "min_tokens": 1}), 400,
                  "stop_token_ids")
    top_k_zero = post({**ok, "top_k": -5})
    _assert_error(top_k_zero, 400, "top_k")
    assert "0 (disabled)" in top_k_zero.json()["error"]["message"]
    # The largest seed with n = 2 forks into seeds past 2**64: it runs.
    forked = post({**ok, "seed": 2**64 - 1, "n": 2, "temperature": 1.0})
    assert forked.status_code == 200 and len(forked.json()["choices"]) == 2
    # A lone UTF-16 surrogate, as JSON can carry it.
    surrogate = b'{"prompt": "caf\\ud800", "max_tokens": 2}'
    _assert_error(post(surrogate, headers={"Content-Type": "application/json"}), 400, "prompt")
    chat_surrogate = (b'{"messages": [{"role": "user", "content": "x\\udc00"}],'
                      b' "max_tokens": 2}')
    _assert_error(post(chat_surrogate, path=chat_url,
                       headers={"Content-Type": "application/json"}), 400, "messages")
    # A body over the limit is refused before it is read; text that cannot fit
    # the context is refused by its length, before it is tokenized.
    t0 = time.monotonic()
    _assert_error(post(b"x" * (20 * 2**20), headers={"Content-Type": "application/json"}), 413)
    _assert_error(post({**ok, "prompt": "word " * (2**20)}), 400, "prompt")
    _assert_error(post({"messages": [{"role": "user", "content": "word " * 2**20}]},
                       path=chat_url), 400, "messages")
    _assert_error(post({"prompt": "word " * 2**20}, path=f"{server.url}/tokenize"), 400,
                  "prompt")
    assert time.monotonic() - t0 < 30
    health = [time.monotonic()]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert time.monotonic() - health[0] < 1.0

    text += "".join(c.choices[0].text for c in stream if c.choices)
    assert text == expected


# ---------------------------------------------------------------- disconnect, metrics


@slow
def test_client_disconnect_aborts_and_frees_blocks(server, model_name):
    before = _wait_until(lambda: (m := _metrics(server))["pllm:num_requests_running{}"] == 0
                         and m, timeout=60)
    body = {"model": model_name, "prompt": "Write a very long story about a dragon.",
            "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                      timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(3):  # a few tokens in: the request holds KV blocks now
            next(lines)
        during = _metrics(server)
        assert during["pllm:num_requests_running{}"] == 1
        assert during["pllm:kv_cache_usage_perc{}"] > before["pllm:kv_cache_usage_perc{}"]
    # The response is closed mid-stream: the server must abort the request.

    def settled():
        m = _metrics(server)
        return (m["pllm:num_requests_running{}"] == 0
                and m["pllm:request_finished_total{finished_reason=abort}"]
                == before["pllm:request_finished_total{finished_reason=abort}"] + 1) and m

    after = _wait_until(settled, timeout=60)
    assert after, _metrics(server)
    assert after["pllm:kv_cache_usage_perc{}"] == before["pllm:kv_cache_usage_perc{}"]
    assert after["pllm:num_free_blocks{}"] == before["pllm:num_free_blocks{}"]
    assert after["pllm:generation_tokens_total{}"] < before["pllm:generation_tokens_total{}"] + 900


@slow
def test_metrics_counters_move(server, client, model_name):
    before = _metrics(server)
    for name in ("pllm:num_requests_waiting{}", "pllm:prefix_cache_hit_rate{}",
                 "pllm:inter_token_latency_seconds_count{}"):
        assert name in before
    r = client.completions.create(model=model_name, prompt=PROMPTS[1], max_tokens=5,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    after = _metrics(server)

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert delta("pllm:prompt_tokens_total{}") == r.usage.prompt_tokens
    assert delta("pllm:generation_tokens_total{}") == 5
    assert delta("pllm:request_finished_total{finished_reason=length}") == 1
    assert delta("pllm:time_to_first_token_seconds_count{}") == 1
    assert delta("pllm:e2e_request_latency_seconds_count{}") == 1
    assert delta("pllm:inter_token_latency_seconds_count{}") == 4
    assert 0 <= after["pllm:prefix_cache_hit_rate{}"] <= 1


# ---------------------------------------------------------------- the async engine alone


def test_async_engine_rejects_aborts_and_survives_a_failed_step():
    from pllm import SamplingParams
    from pllm.entrypoints.openai.async_engine import AsyncLLMEngine, RequestFailedError
    from pllm.entrypoints.openai.metrics import ServerMetrics

    fake, metrics = ScriptedEngine(), ServerMetrics("fake")

    async def run() -> None:
        engine = AsyncLLMEngine(fake, observer=metrics)
        engine.start()
        outs = [o async for o in engine.generate("hi", SamplingParams(max_tokens=3), "a")]
        assert [o.outputs[0].text for o in outs][-1] == "xxx" and outs[-1].finished

        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("bad", "", SamplingParams())

        gen = engine.generate("hi", SamplingParams(max_tokens=10**6), "long")
        await gen.__anext__()
        await gen.aclose()  # the consumer went away: the request must be aborted
        assert _wait_until(lambda: "long" in fake.aborted and not fake.requests, timeout=10)

        stream = await engine.add_request("doomed", "hi", SamplingParams(max_tokens=10**6))
        await stream.__anext__()
        fake.fail_next_step = True
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in stream:
                pass
        outs = [o async for o in engine.generate("hi", SamplingParams(max_tokens=2), "after")]
        assert outs[-1].finished and engine.is_running

        # A request the engine ends alone fails its own stream, and only it.
        bystander = await engine.add_request("by", "hi", SamplingParams(max_tokens=20))
        with pytest.raises(RequestFailedError, match="sampling failed"):
            async for _ in engine.generate(ScriptedEngine.FAILING_PROMPT,
                                           SamplingParams(max_tokens=5), "bad"):
                pass
        assert [o async for o in bystander][-1].outputs[0].text == "x" * 20
        await engine.shutdown()
        assert not engine.is_running and fake.shut_down  # the engine's worker processes too

    asyncio.run(run())
    for reason, count in (("abort", 3), ("length", 3), ("stop", 0)):
        labels = {"model_name": "fake", "finished_reason": reason}
        assert metrics.registry.get_sample_value("pllm:request_finished_total", labels) == count


def test_the_engine_loop_runs_on_the_thread_that_built_the_engine():
    """``pllm serve`` builds the engine on an EngineThread and runs the loop
    there: the OpenMP regions of loading and of every step start from one
    thread (a second one makes libgomp stop spinning between regions). A
    failed build raises in the caller."""
    from pllm import SamplingParams
    from pllm.entrypoints.openai.async_engine import AsyncLLMEngine, EngineThread

    class ThreadNoting(ScriptedEngine):
        def __init__(self):
            super().__init__()
            self.built_on, self.stepped_on = threading.get_ident(), set()

        def step(self):
            self.stepped_on.add(threading.get_ident())
            return super().step()

    host = EngineThread()
    with pytest.raises(ValueError, match="no such model"):
        host.call(lambda: (_ for _ in ()).throw(ValueError("no such model")))
    fake = host.call(ThreadNoting)
    assert fake.built_on == host.thread.ident != threading.get_ident()

    async def run() -> None:
        engine = AsyncLLMEngine(fake, thread=host)
        engine.start()
        outs = [o async for o in engine.generate("hi", SamplingParams(max_tokens=3), "a")]
        assert outs[-1].finished
        await engine.shutdown()

    asyncio.run(run())
    assert fake.stepped_on == {fake.built_on}
    assert not host.thread.is_alive()  # the loop was its last job
    with pytest.raises(RuntimeError, match="last job"):
        host.call(ThreadNoting)  # would never run: refused rather than hang


def test_a_broken_engine_ends_the_streams_while_its_step_is_stuck():
    """A rank's node vanished: the executor says ``broken`` at once, but the
    step in progress waits in a collective (until the process group's
    timeout). The streams end with the engine's error within a second, and
    new requests are refused, without waiting for the step."""
    from pllm import SamplingParams
    from pllm.entrypoints.openai.async_engine import AsyncLLMEngine, EngineDeadError

    release = threading.Event()

    class StuckEngine(ScriptedEngine):
        broken = None

        def step(self):
            if self.broken:
                release.wait(30)  # a collective that never completes (in this test)
            return super().step()

    fake = StuckEngine()

    async def run() -> None:
        engine = AsyncLLMEngine(fake)
        engine.start()
        stream = await engine.add_request("s", "hi", SamplingParams(max_tokens=10**6))
        await stream.__anext__()
        fake.broken = "tensor-parallel group stopped: rank 1 (Ray actor) died: node gone"
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="rank 1"):
            async for _ in stream:
                pass
        assert time.monotonic() - t0 < 5
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await engine.add_request("late", "hi", SamplingParams(max_tokens=2))
        release.set()
        await engine.shutdown()

    asyncio.run(run())
