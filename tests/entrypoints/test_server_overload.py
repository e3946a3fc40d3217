"""Overload: four times the KV cache's capacity in concurrent streams, on a
real `pllm serve` of the tiny model with a tiny cache. Every stream finishes
whole (preempted requests are recomputed, and /metrics counts it), and
/health answers quickly throughout."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from server_utils import metric, running_server  # noqa: E402

BLOCK_SIZE = 16
CAPACITY_TOKENS = 512  # 2 layers x 2 KV heads x 16 dims x fp32 x K and V = 512 B a token
NUM_STREAMS = 16
MAX_TOKENS = 120  # with the prompt, 16 streams hold 4x the cache at their end


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    with running_server([tiny_model_dir, "--device", "cpu", "--block-size", str(BLOCK_SIZE),
                         "--kv-cache-memory", str(CAPACITY_TOKENS * 512),
                         "--max-model-len", "256", "--max-num-seqs", str(NUM_STREAMS)]) as proc:
        yield proc


@pytest.mark.slow
def test_four_times_the_cache_in_streams_all_finish_and_health_stays_fast(tiny_server):
    url = f"{tiny_server.url}/v1/completions"
    preemptions_before = metric(tiny_server, "pllm:num_preemptions")
    health: list[float] = []
    done = threading.Event()

    def poll_health() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                t0 = time.monotonic()
                assert client.get(f"{tiny_server.url}/health").status_code == 200
                health.append(time.monotonic() - t0)
                time.sleep(0.02)

    async def stream(client: httpx.AsyncClient, i: int) -> tuple[int, str | None]:
        body = {"prompt": f"stream {i} " * 2, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}
        num_chunks, finish = 0, None
        async with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                assert '"error"' not in line, line
                if line.startswith("data: {"):
                    num_chunks += 1
                    if '"finish_reason":"length"' in line:
                        finish = "length"
        return num_chunks, finish

    async def run() -> list[tuple[int, str | None]]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(NUM_STREAMS)))

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        results = asyncio.run(run())
    finally:
        done.set()
        poller.join(30)
    assert [finish for _, finish in results] == ["length"] * NUM_STREAMS
    assert all(n >= 1 for n, _ in results)
    assert metric(tiny_server, "pllm:num_preemptions") > preemptions_before
    generated = metric(tiny_server, "pllm:generation_tokens_total")
    assert generated >= NUM_STREAMS * MAX_TOKENS
    assert len(health) > 10
    print(f"/health under overload: {len(health)} polls, median "
          f"{statistics.median(health) * 1e3:.1f} ms, max {max(health) * 1e3:.1f} ms")
    assert statistics.median(health) < 0.1 and max(health) < 1.0
