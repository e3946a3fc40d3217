"""A Poisson stream of streaming completions against an OpenAI-compatible server.

For each request rate, requests (the workload's prompts, sent as token ids
with ``ignore_eos``) start at exponentially spaced times. No request starts
after ``max_seconds``; those still running ``drain_seconds`` later are
cancelled and counted, not timed. Token arrivals are the streamed chunks that
carry text, and the first chunk with a choice even when its text is empty (a
server may hold back an incomplete character); a chunk may hold more than one
token. The output token count comes from the last usage chunk, else from
llama.cpp's ``timings``, else from the arrivals; each row says which.

The server is one already running at a base URL, or servers that
``launch.py`` starts for every rate.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pllm.bench.figures import percentile
from pllm.bench.machine import cpu_times, steal_fraction
from pllm.bench.workload import BenchRequest

logger = logging.getLogger(__name__)


class ServeBenchError(RuntimeError):
    """The server cannot be benchmarked: unreachable, remote without consent, no
    model, a malformed launch command, or a launched server that died or never
    became ready."""


def check_loopback(base_url: str, allow_remote: bool) -> None:
    """Benchmark traffic goes to this machine unless ``allow_remote``."""
    host = urlsplit(base_url).hostname
    if not host:
        raise ServeBenchError(
            f"base URL {base_url!r} has no host; expected e.g. http://127.0.0.1:8000/v1")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ServeBenchError(
            f"refusing to benchmark {host!r}: only loopback hosts (127.0.0.1, ::1, localhost) "
            f"unless --allow-remote is given")


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # asked for
    start: float
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    num_output_tokens: int = 0
    num_tokens_from: str | None = None  # "usage", "timings" or "chunks"


def _output_count(chunk: dict) -> tuple[int | None, str | None]:
    """(completion tokens, where from) a chunk reports, if any."""
    usage = chunk.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        return usage["completion_tokens"], "usage"
    timings = chunk.get("timings") or {}  # llama-server's own figures
    if timings.get("predicted_n") is not None:
        return timings["predicted_n"], "timings"
    return None, None


async def _send(client, url: str, model: str, req: BenchRequest, t0: float) -> RequestResult:
    res = RequestResult(req.prompt_len, req.output_len, start=time.perf_counter() - t0)
    payload = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len,
               "temperature": 0.0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    num_arrivals, counted = 0, {}
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:300]
                    return res
                num, source = _output_count(chunk)
                if num is not None:
                    counted[source] = num  # usage may come in every chunk, cumulative
                choices = chunk.get("choices") or []
                if any(c.get("text") for c in choices) or (choices and num_arrivals == 0):
                    now = time.perf_counter()
                    if num_arrivals == 0:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last, num_arrivals = now, num_arrivals + 1
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.e2e_s = time.perf_counter() - start
    res.num_tokens_from = next((s for s in ("usage", "timings") if s in counted), "chunks")
    res.num_output_tokens = counted.get(res.num_tokens_from, num_arrivals)
    res.ok = num_arrivals > 0
    if not res.ok:
        res.error = "the stream carried no tokens"
    return res


def _arrival_times(num: int, rate: float, seed: int) -> list[float]:
    if math.isinf(rate):
        return [0.0] * num
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(num):
        times.append(t)
        t += rng.expovariate(rate)
    return times


async def _run_rate(client, url: str, model: str, requests: list[BenchRequest], rate: float, *,
                    max_seconds: float, drain_seconds: float, seed: int) -> dict:
    t0 = time.perf_counter()
    ticks = cpu_times()
    tasks = []
    for req, at in zip(requests, _arrival_times(len(requests), rate, seed)):
        if at > max_seconds:
            break
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_send(client, url, model, req, t0)))
    launch_s = time.perf_counter() - t0
    deadline = max(max_seconds - launch_s, 0) + drain_seconds
    done, pending = await asyncio.wait(tasks, timeout=deadline) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    results = [t.result() for t in tasks if t in done]
    row = summarize(results, rate=rate, num_sent=len(tasks), num_cancelled=len(pending),
                    launch_s=launch_s)
    row["cpu_steal"] = steal_fraction(ticks, cpu_times())
    return row


def summarize(results: list[RequestResult], *, rate: float, num_sent: int, num_cancelled: int,
              launch_s: float) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    duration = max((r.start + r.e2e_s for r in ok), default=0.0)
    ttft = [r.ttft_s for r in ok]
    itl = [x for r in ok for x in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    tpot = [(r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1]
    num_out = sum(r.num_output_tokens for r in ok)

    def stats(name: str, xs: list[float]) -> dict:
        return {f"{name}_mean_s": statistics.fmean(xs) if xs else None,
                f"{name}_p50_s": percentile(xs, 50), f"{name}_p99_s": percentile(xs, 99)}

    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "num_sent": num_sent,
        "num_completed": len(ok),
        "num_failed": len(errors),
        "num_cancelled": num_cancelled,
        "first_error": errors[0] if errors else None,
        "launch_s": launch_s,
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else 0.0,
        "output_tokens_per_s": num_out / duration if duration else 0.0,
        "num_prompt_tokens": sum(r.prompt_len for r in ok),
        "num_output_tokens": num_out,
        "num_output_tokens_from": dict(collections.Counter(r.num_tokens_from for r in ok)),
        **stats("ttft", ttft), **stats("itl", itl), **stats("e2e", e2e), **stats("tpot", tpot),
    }


async def _served_model(client, base_url: str) -> str:
    try:
        resp = await client.get(f"{base_url}/models")
    except Exception as exc:  # noqa: BLE001
        raise ServeBenchError(
            f"cannot reach {base_url}/models: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        raise ServeBenchError(
            f"{base_url}/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or []
    if not data:
        raise ServeBenchError(f"{base_url}/models lists no model; pass --served-model-name")
    return data[0]["id"]


def _client(api_key: str | None):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits,
                             headers=headers, trust_env=False)


async def _warmed_up(client, base_url: str, model: str | None,
                     requests: list[BenchRequest]) -> str:
    """The model to request, after one untimed warm-up request."""
    model = model or await _served_model(client, base_url)
    url = f"{base_url}/completions"
    # One repeated token: the warm-up shares no prefix-cache block with the workload.
    warm_prompt = [requests[0].prompt_token_ids[0]] * 16
    warm = await _send(client, url, model, BenchRequest(warm_prompt, 2), time.perf_counter())
    if not warm.ok:
        raise ServeBenchError(f"the warm-up request to {url} failed: {warm.error}")
    return model


async def run_serve_bench(base_url: str, requests: list[BenchRequest], rates: list[float], *,
                          model: str | None = None, max_seconds: float = 120.0,
                          drain_seconds: float = 60.0, seed: int = 0,
                          api_key: str | None = None,
                          requests_per_rate: list[list[BenchRequest]] | None = None) -> dict:
    """One summary per rate (in order) from the server at ``base_url``, after
    one untimed warm-up request. ``requests_per_rate`` (one list per rate)
    replaces ``requests``, so that a later rate need not resend prompts the
    server has cached."""
    base_url = base_url.rstrip("/")
    async with _client(api_key) as client:
        model = await _warmed_up(client, base_url, model, requests)
        per_rate = []
        for i, rate in enumerate(rates):
            batch = requests_per_rate[i] if requests_per_rate else requests
            per_rate.append(await _run_rate(client, f"{base_url}/completions", model, batch, rate,
                                            max_seconds=max_seconds, drain_seconds=drain_seconds,
                                            seed=seed))
    return {"model": model, "base_url": base_url, "per_rate": per_rate}
