"""The tpu and neuron platforms end to end on torch-xla's CPU backend
(PLLM_XLA_EMULATE=cpu): greedy tokens equal to transformers' through a mixed
batch with chunked prefill, prefix-cache hits and preemption; a mixed
64-request run after the warm-up compiles nothing new."""

from __future__ import annotations

import dataclasses
import random

import pytest

from pllm.core.engine import LLMEngine
from pllm.core.sampling_params import SamplingParams
from pllm.entrypoints.engine_args import EngineArgs
from pllm.loader.testing import make_tiny_model
from pllm.testing.e2e import hf_greedy

MAX_NEW = 24


def _platform(name: str):
    from pllm.platforms.neuron.platform import NeuronPlatform
    from pllm.platforms.tpu.platform import TPUPlatform

    return {"tpu": TPUPlatform, "neuron": NeuronPlatform}[name]()


def _engine(model_dir, device: str, **args) -> LLMEngine:
    args = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8,
            "max_num_batched_tokens": 32, **args}
    config = EngineArgs(model=str(model_dir), device=device, **args).create_engine_config()
    return LLMEngine(config, platform=_platform(device))


def _prompts() -> list[list[int]]:
    """Uneven lengths (a 45-token prompt takes two chunks of 32), and two
    prompts that share a 32-token prefix with the first (prefix-cache hits)."""
    rng = random.Random(0)
    first = [rng.randrange(3, 300) for _ in range(45)]
    return [first, [7, 8, 9], first[:32] + [11, 12, 13], [rng.randrange(3, 300) for _ in range(17)],
            first[:32] + [21] * 5, [5]]


def _run_greedy(engine: LLMEngine, prompts, max_new: int = MAX_NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), list(ids), params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("xla-models")
    return {arch: make_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen3")}


@pytest.mark.parametrize("device,arch", [("tpu", "llama"), ("tpu", "qwen3"), ("neuron", "llama")])
def test_greedy_matches_transformers_with_chunks_prefix_hits_and_preemption(models, device, arch):
    prompts = _prompts()
    want = hf_greedy(models[arch], prompts, MAX_NEW)
    # 8 blocks of 16 tokens cannot hold six growing sequences at once: some are preempted.
    engine = _engine(models[arch], device, num_blocks_override=8)
    try:
        got = _run_greedy(engine, prompts)
        stats = engine.get_stats()
    finally:
        engine.shutdown()
    assert got == want
    assert stats.prefix_cache_hits > 0, stats
    assert stats.num_preemptions > 0, stats
    assert stats.num_free_blocks == stats.num_total_blocks, f"blocks leaked: {stats}"


def test_after_the_warm_up_serving_compiles_nothing(models):
    """64 requests mixing greedy, temperature, top-k/top-p and seeded sampling,
    uneven prompt and output lengths, arriving in waves: zero new XLA
    programs (torch-xla's CompileTime count) once the engine is up."""
    from pllm.platforms.common.xla import runtime

    engine = _engine(models["llama"], "tpu", max_num_batched_tokens=64)
    try:
        warm = runtime.compilations()[0]
        rng = random.Random(1)
        params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8),
                  SamplingParams(temperature=1.0, top_k=20, top_p=0.9),
                  SamplingParams(temperature=0.7, seed=3), SamplingParams(temperature=0.9, min_p=0.05)]
        for wave in range(4):
            for i in range(16):
                p = params[(wave * 16 + i) % len(params)]
                prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 100))]
                p = dataclasses.replace(p, max_tokens=rng.randrange(1, 24), ignore_eos=True)
                engine.add_request(f"{wave}-{i}", prompt, p)
            for _ in range(rng.randrange(3, 12)):
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
        new = runtime.compilations()[0] - warm
    finally:
        engine.shutdown()
    assert warm > 0
    assert new == 0, f"{new} XLA programs compiled while serving"
