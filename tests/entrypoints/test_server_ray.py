"""``pllm serve -tp 2 --distributed-executor-backend ray``, on loopback:
the server starts its own one-node Ray cluster (no RAY_ADDRESS). The
official client gets the one-rank engine's text; the rank-1 actor killed
mid-generation ends the stream with the engine's error and makes
``/health`` unhealthy within seconds; SIGTERM then leaves no Ray or worker
process behind."""

from __future__ import annotations

import time

import pytest
from ray_utils import needs_ray, rank_processes

from pllm import SamplingParams


@needs_ray
def test_serve_on_ray_survives_nothing_of_a_killed_rank(ray_env, tiny_model_dir, tiny_llm):
    """The server starts its own one-node Ray cluster (no RAY_ADDRESS)."""
    openai = pytest.importorskip("openai")
    import httpx
    import psutil
    from server_utils import ServerProcess

    prompt = "The capital of France is"
    expected = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10),
                                 use_tqdm=False)[0].outputs[0].text
    server = ServerProcess([tiny_model_dir, "--device", "cpu", "--kv-cache-memory", "8MB",
                            "--max-model-len", "256", "--tensor-parallel-size", "2",
                            "--distributed-executor-backend", "ray",
                            "--served-model-name", "tiny"])
    try:
        server.wait_ready(timeout=240)
        tree = psutil.Process(server.proc.pid).children(recursive=True)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == expected

        ranks = [p for p in rank_processes() if p in tree or p.ppid() in {t.pid for t in tree}]
        assert len(ranks) == 1, f"expected one rank-1 actor under the server, got {ranks}"
        # As long a stream as the context allows: the kill lands while it runs.
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=240,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)  # generating
        ranks[0].kill()
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:  # the stream ends with the engine's error
            for _ in chunks:
                pass
        assert "tensor-parallel rank 1" in str(info.value), info.value
        while httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
            assert time.monotonic() - t0 < 15, "/health still healthy"
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        assert server.terminate() == 0, server.log_tail()
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"
    finally:
        server.kill()
        server.cleanup()


