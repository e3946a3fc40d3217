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
                                block_size=runner.block_size, max_model_len=worker.config.model.max_model_len,
                                batch_sizes=batch_sizes, device=runner.device)
    graphs.capture_all()
    runner.decode_runner = graphs
    return graphs


# An fp8 cache decodes through the torch path, whose per-step plan must follow
# the persistent buffers from one replay to the next.
# The CPU platform: its backend reads each sequence's length from the device
# tensor, as a backend that replays graphs must (the fake's reference
# attention reads the host copies, which a decode runner sets to the worst
# case, so the fake claims no graphs).
@pytest.mark.parametrize("device, enforce_eager, kv_cache_dtype", [
    ("cpu", False, "auto"), ("cpu", True, "auto"), ("cpu", False, "fp8"),
], ids=["fused-layers", "module-layers", "fp8-cache"])
def test_padded_decode_steps_match_the_eager_engine(tiny_model_dir, device, enforce_eager,
                                                    kv_cache_dtype):
    from pllm import LLM, SamplingParams

    # 5 prompts sharing a prefix (prefix-cache hits), one asking for n=2
    # (copy-on-write forks): decode batches of 5-7 rows pad to 8, and as
    # requests finish at different lengths, smaller batches pad to 4 and 2.
    prefix = list(range(20, 40))
    prompts = [prefix + [50 + i] * (i + 1) for i in range(5)]
    params = [SamplingParams(max_tokens=6 + 4 * i, temperature=0.0, ignore_eos=True) for i in range(5)]
    params[1] = SamplingParams(max_tokens=9, n=2, temperature=0.0, ignore_eos=True)

    def run(with_graphs: bool):
        llm = LLM(model=str(tiny_model_dir), device=device, kv_cache_memory="16MiB",
                  max_model_len=128, enforce_eager=enforce_eager, kv_cache_dtype=kv_cache_dtype)
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
    from pllm.platforms.triton.graphs import CUDAGraphDecodeRunner

    prompts = [list(range(20, 30 + 3 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=8 + 5 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    results = {}
    for eager in (True, False):
        llm = LLM(model=str(tiny_model_dir), device="cuda", dtype="float32", max_model_len=128,
                  memory_utilization=0.3, max_num_seqs=16, enforce_eager=eager)
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


# ---- graph capture, checked on the CPU -------------------------------------
# What a GPU's capture would refuse (host reads, data-dependent shapes, host
# data copied in), found by watching the torch ops of the step. The Triton
# kernels are not run here: their launches are recorded instead (the kernels
# themselves are checked against the reference in test_triton_attention.py).


def test_capture_violations_name_each_host_read_and_its_line():
    from pllm.testing.capture import capture_violations

    t = torch.arange(6)
    with capture_violations() as clean:
        torch.full((3,), 2.0) @ torch.ones(3)
        t.index_select(0, t[:2]).masked_fill(t[:2] > 0, 0)
        torch.where(t > 2, t, 0).cumsum(0)
    assert clean == []
    with torch.inference_mode(), capture_violations() as found:  # as engines run
        t.max().item()
        bool(t.any())
        t[t > 2]
        t.nonzero()
        torch.tensor([1, 2])
        t.tolist()
        t.cpu()
        t.clone()[t > 2] = t[:1]
    assert len(found) == 8, "\n".join(map(str, found))
    assert all("test_graphs.py" in v.where for v in found), found
    assert "reads a device value back" in found[0].why
    assert "boolean mask" in found[2].why
    assert "host-to-device copy" in found[4].why
    assert "copies to the host" in found[6].why
    assert "boolean mask" in found[7].why and "index_put" in found[7].op


def test_capture_violations_ignore_other_threads():
    import threading

    from pllm.testing.capture import capture_violations

    t = torch.arange(6)
    with capture_violations() as found:
        other = threading.Thread(target=lambda: (t.max().item(), t.tolist()))
        other.start()
        other.join()
    assert found == []


@pytest.fixture
def triton_launches(monkeypatch):
    """Triton kernel launches recorded by name instead of compiled and run."""
    jit = pytest.importorskip("triton.runtime.jit", reason="needs triton")
    launches: list[str] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(self.fn.__name__)

    monkeypatch.setattr(jit.JITFunction, "run", record)
    return launches


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.float8_e4m3fn], ids=["fp16", "fp8"])
def test_the_triton_decode_step_is_capturable(triton_launches, kv_cache_dtype):
    from pllm.platforms.triton.attention import TritonAttentionBackend
    from pllm.testing.capture import check_decode_capturable

    for min_partition in (256, 16):  # without and with split-KV (and its reduce)
        check_decode_capturable(TritonAttentionBackend(min_partition=min_partition), device="cpu",
                                dtype=torch.float16, block_size=16, kv_cache_dtype=kv_cache_dtype)
    assert triton_launches == ["_reshape_and_cache_kernel", "_decode_split_kernel"] * 2 \
        + ["_decode_reduce_kernel"]


def test_a_backend_that_reads_back_is_not_capturable(triton_launches):
    from pllm.platforms.triton.attention import TritonAttentionBackend
    from pllm.testing.capture import check_decode_capturable

    class Syncing(TritonAttentionBackend):
        def forward(self, query, kv_cache, metadata, **kwargs):
            if int(metadata.seq_lens.max()) > 0:  # what a GPU's capture refuses
                return super().forward(query, kv_cache, metadata, **kwargs)
            return query

    with pytest.raises(AssertionError, match=r"test_graphs.py:\d+ in forward: "
                                             r"Tensor.__int__ reads a device value back"):
        check_decode_capturable(Syncing(), device="cpu", dtype=torch.float16, block_size=16)


@pytest.mark.parametrize("kv_cache_dtype", [torch.float32, torch.float8_e4m3fn],
                         ids=["fp32-cache", "fp8-cache"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_models_decode_step_is_capturable(tmp_path, triton_launches, monkeypatch, arch,
                                              kv_cache_dtype):
    """The whole forward the cuda platform records (the model's own modules,
    rotary, q/k norms, the Triton backend with and without split-KV) at every
    bucket, as capture_all runs it."""
    from pllm import LLM
    from pllm.core.interfaces import Platform
    from pllm.loader.testing import make_tiny_model
    from pllm.models.layers import RotaryEmbedding
    from pllm.platforms.cpu.platform import CPUPlatform
    from pllm.platforms.triton.attention import TritonAttentionBackend
    from pllm.testing.capture import capture_violations

    # The model as the cuda platform runs it: without the CPU's compiled layers.
    monkeypatch.setattr(CPUPlatform, "prepare_model", Platform.prepare_model)
    llm = LLM(model=make_tiny_model(tmp_path / arch, arch=arch), kv_cache_memory="4MiB",
              max_model_len=128)
    model = llm.llm_engine.executor.worker.runner.model
    spec = model.spec
    assert type(model.rotary) is RotaryEmbedding
    found = []

    class Checked(StaticDecodeRunner):
        def capture(self, forward):
            with capture_violations() as step:
                forward()
            found.extend(step)
            return forward

    # 16 keys a partition: 128-token contexts split (and reduce); 256: one split.
    for min_partition, reduce in ((16, ["_decode_reduce_kernel"]), (256, [])):
        triton_launches.clear()
        backend = TritonAttentionBackend(min_partition=min_partition)
        caches = [torch.zeros(backend.kv_cache_shape(16, 16, spec.num_kv_heads, spec.head_dim),
                              dtype=kv_cache_dtype) for _ in range(model.num_layers)]
        runner = Checked(model, backend, caches, block_size=16, max_model_len=128,
                         batch_sizes=[1, 2, 4], device=torch.device("cpu"))
        runner.capture_all()
        assert not found, "\n".join(map(str, found))
        per_layer = ["_reshape_and_cache_kernel", "_decode_split_kernel"] + reduce
        assert triton_launches == per_layer * model.num_layers * 3
