"""Decode steps on persistent, padded buffers (``pllm.core.graphs``): the
machinery CUDA graphs replay through, run eagerly on the CPU. Padding rows
must not change the real rows' tokens, the KV cache or the block accounting."""

from __future__ import annotations

import pytest
import torch

from pllm.core.graphs import StaticDecodeRunner, decode_batch_sizes


def test_decode_batch_sizes():
    assert decode_batch_sizes(128) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128]
    assert decode_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert decode_batch_sizes(3) == [1, 2, 3]
    assert decode_batch_sizes(1) == [1]


def _install(llm, batch_sizes) -> StaticDecodeRunner:
    worker = llm.llm_engine.executor.worker
    runner = worker.runner
    graphs = StaticDecodeRunner(runner.model, runner.backend, runner.kv_caches,
                                block_size=runner.block_size, max_model_len=worker.max_model_len,
                                batch_sizes=batch_sizes, device=runner.device)
    graphs.capture_all()
    runner.decode_runner = graphs
    return graphs


# An fp8 cache decodes through the torch path, whose per-step plan must follow
# the persistent buffers from one replay to the next.
@pytest.mark.parametrize("enforce_eager, kv_cache_dtype", [(False, "auto"), (True, "auto"),
                                                           (False, "fp8")],
                         ids=["fused-layers", "module-layers", "fp8-cache"])
def test_padded_decode_steps_match_the_eager_engine(tiny_model_dir, enforce_eager, kv_cache_dtype):
    from pllm import LLM, SamplingParams

    # 5 prompts sharing a prefix (prefix-cache hits), one asking for n=2
    # (copy-on-write forks): decode batches of 5-7 rows pad to 8, and as
    # requests finish at different lengths, smaller batches pad to 4 and 2.
    prefix = list(range(20, 40))
    prompts = [prefix + [50 + i] * (i + 1) for i in range(5)]
    params = [SamplingParams(max_tokens=6 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(5)]
    params[1] = SamplingParams(max_tokens=9, n=2, temperature=0.0, ignore_eos=True)

    def run(with_graphs: bool):
        llm = LLM(model=str(tiny_model_dir), kv_cache_memory="16MiB", max_model_len=128,
                  enforce_eager=enforce_eager, kv_cache_dtype=kv_cache_dtype)
        graphs = _install(llm, [1, 2, 4, 8]) if with_graphs else None
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.llm_engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks, f"blocks leaked: {stats}"
        return [[c.token_ids for c in o.outputs] for o in outs], graphs

    want, _ = run(False)
    got, graphs = run(True)
    assert got == want
    assert graphs.num_replays > 10, "the padded decode path was not used"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with a CUDA build of torch")
def test_cuda_graphs_match_eager_on_gpu(tiny_model_dir):
    """The real thing: the cuda platform records its decode graphs at start-up
    and replays them; greedy tokens equal the eager engine's."""
    from pllm import LLM, SamplingParams
    from pllm.platforms.cuda.graphs import CUDAGraphDecodeRunner

    prompts = [list(range(20, 30 + 3 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 5 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    results = {}
    for eager in (True, False):
        llm = LLM(model=str(tiny_model_dir), device="cuda", dtype="float32", max_model_len=128,
                  gpu_memory_utilization=0.3, max_num_seqs=16, enforce_eager=eager)
        graphs = llm.llm_engine.executor.worker.runner.decode_runner
        if eager:
            assert graphs is None
        else:
            assert isinstance(graphs, CUDAGraphDecodeRunner)
        results[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if not eager:
            assert graphs.num_replays > 10
        del llm
        torch.cuda.empty_cache()
    assert results[False] == results[True]
