"""Tensor-parallel engines' life: start-up and shutdown with the server,
the padded decode path (what CUDA graphs record) across ranks, a rank that
dies. Each test owns its engine: one process holds one process group, so
these run apart from ``test_tensor_parallel.py``'s shared engines."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.core.executor.multiproc import ExecutorBrokenError
from pllm.platforms.cpu.platform import CPUPlatform


def test_server_with_two_ranks_serves_and_leaves_no_process_behind(tiny_model_dir, tiny_llm):
    """`pllm serve -tp 2`: the official client gets the one-rank engine's
    greedy text, and SIGTERM takes the rank-1 process down with the server."""
    openai = pytest.importorskip("openai")
    psutil = pytest.importorskip("psutil")
    from server_utils import ServerProcess

    prompt = "The capital of France is"
    expected = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10),
                                 use_tqdm=False)[0].outputs[0].text
    server = ServerProcess([tiny_model_dir, "--device", "cpu", "--kv-cache-memory", "8MB",
                            "--max-model-len", "128", "--tensor-parallel-size", "2",
                            "--served-model-name", "tiny"])
    try:
        server.wait_ready(timeout=180)
        # The rank-1 worker (spawned), not multiprocessing's resource tracker.
        children = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                    if "spawn_main" in " ".join(p.cmdline())]
        assert len(children) == 1, "no rank-1 process under the server"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == expected
        assert server.terminate() == 0, server.log_tail()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {alive}"
    finally:
        server.kill()
        server.cleanup()


_GRAPH_CAPS = dataclasses.replace(CPUPlatform().capabilities, supports_graphs=True)


class PaddedDecodePlatform(CPUPlatform):
    """The CPU platform with the padded decode runner that CUDA graphs replay
    through (run eagerly here): its all-reduces must line up on every rank."""

    @property
    def capabilities(self):
        return _GRAPH_CAPS

    def make_decode_runner(self, model, backend, kv_caches, config):
        from pllm.core.graphs import StaticDecodeRunner

        return StaticDecodeRunner(model, backend, kv_caches, block_size=config.cache.block_size,
                                  max_model_len=config.model.max_model_len, batch_sizes=[1, 2, 4, 8],
                                  device=kv_caches[0].device)


def test_padded_decode_runner_under_two_ranks(tiny_model_dir, tiny_llm):
    from pllm.core.engine import LLMEngine
    from pllm.entrypoints.engine_args import EngineArgs

    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 17, [200, 100]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    args = EngineArgs(model=tiny_model_dir, device="cpu", kv_cache_memory="16MB",
                      tensor_parallel_size=2)
    engine = LLMEngine(args.create_engine_config(), platform=PaddedDecodePlatform())
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.outputs[0].token_ids
        assert [done[i] for i in range(len(prompts))] == expected
        assert engine.executor.worker.runner.decode_runner.num_replays > 10
    finally:
        engine.shutdown()


def test_a_dead_rank_breaks_the_engine_with_a_clear_error(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="4MB", tensor_parallel_size=2)
    try:
        (proc,) = llm.llm_engine.executor._procs
        proc.kill()
        proc.join(10)
        params = SamplingParams(temperature=0.0, max_tokens=4)
        with pytest.raises(ExecutorBrokenError, match=r"rank 1"):
            llm.generate(["hello"], params, use_tqdm=False)
        with pytest.raises(ExecutorBrokenError):  # and it stays broken, not hung
            llm.generate(["hello"], params, use_tqdm=False)
    finally:
        llm.shutdown()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two NVIDIA GPUs with a CUDA build of torch")
def test_two_gpus_over_nccl_match_one(tiny_model_dir):
    """NCCL all-reduces and CUDA graphs that record them: two GPUs give one
    GPU's greedy tokens (fp32)."""
    prompts = [list(range(20, 30 + 3 * i)) for i in range(6)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    results = {}
    for tp in (1, 2):
        llm = LLM(tiny_model_dir, device="cuda", dtype="float32", max_model_len=128,
                  memory_utilization=0.3, max_num_seqs=16, tensor_parallel_size=tp)
        try:
            results[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert results[2] == results[1]


def test_shutdown_gives_the_process_its_threads_back(tiny_model_dir):
    before = torch.get_num_threads()
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="4MB", tensor_parallel_size=2)
    llm.shutdown()
    assert torch.get_num_threads() == before
