"""Tensor parallelism over Ray (``--distributed-executor-backend ray``), on
loopback: a two-node Ray cluster started here (``ray start`` twice, one CPU
each, so that the two ranks must sit on different nodes). The server on Ray
is tested in ``tests/entrypoints/test_server_ray.py``.

* two ranks across the two nodes give the one-rank engine's greedy tokens,
  as tensor parallelism and as two pipeline stages;
* a rank whose step raises stops the engine with that rank's traceback, and
  its actor and the placement group are released;
* an actor killed while nothing runs is seen by the watcher: the engine is
  broken and the placement group released within seconds;
* without Ray installed, the backend says how to install it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from ray_utils import needs_ray, rank_processes, ray_cli

from pllm import LLM, SamplingParams
from pllm.core.executor import ExecutorBrokenError
from pllm.platforms.cpu.platform import CPUPlatform

PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 17]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def two_node_cluster(ray_env, tmp_path_factory):
    """A head node and a second node on this machine, one CPU each; this
    process joins it as a driver (RAY_ADDRESS)."""
    import psutil
    import ray
    from server_utils import free_port

    before = set(psutil.pids())
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    cli = ray_cli()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = subprocess.run([cli, "start", "--head", "--port", str(port),
                           "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                           "--temp-dir", str(temp), *common],
                          capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stdout + head.stderr
    try:
        node = subprocess.run([cli, "start", "--address", f"127.0.0.1:{port}", *common],
                              capture_output=True, text=True, timeout=120)
        assert node.returncode == 0, node.stdout + node.stderr
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
            yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # This cluster's processes only (`ray stop` would stop every cluster
        # on the machine): those started since that name its temp folder or
        # its GCS port, and what they started.
        ours = []
        marks = (str(temp), f"127.0.0.1:{port}", f"--gcs_server_port={port}")
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or ())
            if proc.pid not in before and any(mark in line for mark in marks):
                ours.append(proc)
        for proc in list(ours):
            try:
                ours += proc.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in ours:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(ours, timeout=15)
        for proc in alive:
            proc.kill()


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


@needs_ray
def test_two_ranks_across_two_nodes_match_one_rank(two_node_cluster, tiny_model_dir, tiny_llm):
    import ray
    from ray.util import placement_group_table

    expected = _greedy(tiny_llm)
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="8MB", max_model_len=128,
              tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        executor = llm.llm_engine.executor
        nodes = [p["node_id"] for p in executor.placement]
        assert len(set(nodes)) == 2, executor.placement  # one rank on each node (actors report theirs)
        pg = executor._state["pg"]
        # Rank 0's bundle is reserved on this node, where rank 0 runs.
        here = ray.get_runtime_context().get_node_id()
        assert placement_group_table(pg)["bundles_to_node_id"][0] == here
        assert placement_group_table(pg)["bundles_to_node_id"][1] == nodes[1] != here
        assert _greedy(llm) == expected
    finally:
        llm.shutdown()
    assert placement_group_table(pg)["state"] == "REMOVED"
    deadline = time.monotonic() + 30
    while rank_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not rank_processes()


@needs_ray
def test_two_pipeline_stages_across_two_nodes_match_one_rank(two_node_cluster, tiny_model_dir,
                                                             tiny_llm):
    """``-pp 2``: the first layer on this node, the second, the norm and the
    LM head on the other; the residual stream and the logits cross nodes."""
    expected = _greedy(tiny_llm)
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="8MB", max_model_len=128,
              pipeline_parallel_size=2, distributed_executor_backend="ray")
    try:
        executor = llm.llm_engine.executor
        assert len({p["node_id"] for p in executor.placement}) == 2, executor.placement
        assert _greedy(llm) == expected
        assert llm.llm_engine.max_in_flight == 2
    finally:
        llm.shutdown()


@needs_ray
def test_an_actor_killed_while_idle_is_seen_and_released_at_once(two_node_cluster,
                                                                 tiny_model_dir):
    """No step runs, so no collective fails: the watcher alone must see it,
    mark the engine broken and release the placement group."""
    import ray
    from ray.util import placement_group_table

    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="8MB", max_model_len=128,
              tensor_parallel_size=2, distributed_executor_backend="ray")
    try:
        engine = llm.llm_engine
        pg = engine.executor._state["pg"]
        ray.kill(engine.executor._actors[0], no_restart=True)
        deadline = time.monotonic() + 20
        while engine.broken is None or placement_group_table(pg)["state"] != "REMOVED":
            assert time.monotonic() < deadline, (engine.broken, placement_group_table(pg))
            time.sleep(0.1)
        assert "rank 1 (Ray actor)" in engine.broken, engine.broken
        with pytest.raises(ExecutorBrokenError, match="rank 1"):
            llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()


class FailingRankPlatform(CPUPlatform):
    """The CPU platform, but rank 1's model raises on its fourth forward."""

    def prepare_model(self, model, config):
        model = super().prepare_model(model, config)
        if model.tp.rank == 1:
            forward, calls = model.forward, [0]

            def failing(*args, **kwargs):
                calls[0] += 1
                if calls[0] == 4:
                    raise RuntimeError("injected failure on rank 1")
                return forward(*args, **kwargs)

            model.forward = failing
        return model


@needs_ray
def test_a_failing_rank_stops_the_engine_with_its_traceback(two_node_cluster, tiny_model_dir):
    import ray
    from ray.util import placement_group_table

    from pllm.core.engine import LLMEngine
    from pllm.entrypoints.engine_args import EngineArgs

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors import it
    args = EngineArgs(model=tiny_model_dir, device="cpu", kv_cache_memory="8MB",
                      max_model_len=128, tensor_parallel_size=2,
                      distributed_executor_backend="ray")
    engine = LLMEngine(args.create_engine_config(), platform=FailingRankPlatform())
    try:
        pg = engine.executor._state["pg"]
        engine.add_request("r", PROMPTS[0], PARAMS)
        t0 = time.monotonic()
        with pytest.raises(ExecutorBrokenError) as info:
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - t0 < 30  # no wait for a collective's timeout
        message = str(info.value)
        assert "rank 1" in message and "injected failure on rank 1" in message, message
        assert "Traceback" in message, message
        assert engine.broken is not None
        with pytest.raises(ExecutorBrokenError):  # and it stays broken, not hung
            engine.step()
        assert placement_group_table(pg)["state"] == "REMOVED"
    finally:
        engine.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_without_ray_the_backend_says_how_to_install_it(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(RuntimeError, match=r"needs Ray: pip install 'pllm\[ray\]'"):
        LLM(tiny_model_dir, device="cpu", kv_cache_memory="8MB", tensor_parallel_size=2,
            distributed_executor_backend="ray")
    assert not torch.distributed.is_initialized()


def test_the_backend_is_checked_by_name():
    from pllm.core.config import ParallelConfig

    with pytest.raises(ValueError, match="distributed_executor_backend='rpc' is not one of mp, ray"):
        ParallelConfig(tensor_parallel_size=2, distributed_executor_backend="rpc")


@needs_ray
def test_a_ray_client_address_is_refused(tiny_model_dir, ray_env):
    """Rank 0 runs in this process, which must be a node of the cluster."""
    with pytest.raises(ValueError, match="Ray Client addresses are not supported"):
        LLM(tiny_model_dir, device="cpu", kv_cache_memory="8MB", tensor_parallel_size=2,
            distributed_executor_backend="ray", ray_address="ray://127.0.0.1:10001")
    assert not torch.distributed.is_initialized()
