"""Pipeline parallelism over Ray: ``-tp 2 -pp 2`` (four ranks: this process
and three actors) on a private local Ray cluster the engine starts itself.
The same tokens, logprobs and prompt logprobs as transformers, with two
batches in flight; then the last stage's actor is killed mid-generation: the
engine stops with that rank's error within seconds, and nothing of Ray or
the ranks is left once it shuts down. (``-pp 2`` across two nodes is in
``test_ray_executor.py``.)"""

from __future__ import annotations

import random
import time

import pytest
from ray_utils import needs_ray, rank_processes
from test_pipeline_parallel import MAX_NEW, PARAMS, check_against, expected_outputs

from pllm import LLM, SamplingParams
from pllm.core.executor import ExecutorBrokenError
from pllm.loader.testing import make_tiny_model


@needs_ray
def test_tp2_pp2_on_ray_matches_transformers_then_survives_nothing(ray_env, tmp_path):
    import ray
    from ray.util import placement_group_table

    folder = make_tiny_model(tmp_path / "qwen2", arch="qwen2", num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (5, 17, 40, 3, 22)]
    tokens, logprobs = expected_outputs(folder, prompts)
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB", tensor_parallel_size=2,
              pipeline_parallel_size=2, max_num_batched_tokens=16, max_num_seqs=3,
              distributed_executor_backend="ray")
    try:
        engine = llm.llm_engine
        executor = engine.executor
        assert [p["rank"] for p in executor.placement] == [0, 1, 2, 3]
        check_against(llm.generate(prompts, PARAMS, use_tqdm=False), prompts, tokens, logprobs)
        assert engine.max_in_flight == 2

        pg = executor._state["pg"]
        engine.add_request("long", prompts[0], SamplingParams(max_tokens=10 * MAX_NEW,
                                                              ignore_eos=True))
        for _ in range(4):
            engine.step()
        ray.kill(executor._actors[1], no_restart=True)  # rank 2: the last stage's first rank
        t0 = time.monotonic()
        with pytest.raises(ExecutorBrokenError, match="rank [123]"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 20
        while placement_group_table(pg)["state"] != "REMOVED":
            assert time.monotonic() < deadline, placement_group_table(pg)
            time.sleep(0.1)
    finally:
        llm.shutdown()
    assert not ray.is_initialized()  # the engine's own cluster is gone
    deadline = time.monotonic() + 30
    while rank_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not rank_processes()
