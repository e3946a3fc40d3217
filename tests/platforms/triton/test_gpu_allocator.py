"""How the GPU platforms size the KV cache under ``memory_utilization``,
against a simulated device: torch's caching allocator (live, cached and
peak bytes) and the driver's free memory. The real thing runs in the GPU
tests; what is checked here is the arithmetic."""

from __future__ import annotations

import pytest
import torch

from pllm.core.config import CacheConfig
from pllm.platforms.triton.allocator import GPUKVCacheAllocator

GiB = 1 << 30


class FakeGPU:
    """``total`` bytes; ``outside`` held by the CUDA context and other
    processes; torch's live bytes, its cache of freed blocks, and the peak."""

    def __init__(self, total: int, outside: int) -> None:
        self.total, self.outside = total, outside
        self.live = self.cached = self.peak = 0

    def alloc(self, n: int) -> None:
        take = min(n, self.cached)
        self.cached -= take
        self.live += n
        self.peak = max(self.peak, self.live)

    def free(self, n: int) -> None:  # torch keeps freed blocks cached
        self.live -= n
        self.cached += n

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "mem_get_info", lambda *a: (
            self.total - self.outside - self.live - self.cached, self.total))
        monkeypatch.setattr(cuda, "memory_reserved", lambda *a: self.live + self.cached)
        monkeypatch.setattr(cuda, "memory_allocated", lambda *a: self.live)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a: setattr(self, "peak",
                                                                                 self.live))
        monkeypatch.setattr(cuda, "empty_cache", lambda: setattr(self, "cached", 0))
        monkeypatch.setattr(cuda, "synchronize", lambda *a: None)


def test_budget_is_util_of_total_less_peak_and_memory_outside_torch(monkeypatch):
    gpu = FakeGPU(total=80 * GiB, outside=3 * GiB)
    gpu.install(monkeypatch)
    gpu.alloc(16 * GiB)  # weights
    allocator = GPUKVCacheAllocator()

    def profile_run() -> int:  # a throwaway cache, then the activations
        gpu.alloc(1 * GiB)
        gpu.alloc(5 * GiB)
        gpu.free(6 * GiB)
        return 1 * GiB

    allocator.profile(profile_run)
    budget, why = allocator.default_budget(CacheConfig(memory_utilization=0.9))
    assert budget == int(0.9 * 80 * GiB) - (16 + 5) * GiB - 3 * GiB
    assert "memory_utilization=0.9" in why and "3.00 GiB outside torch" in why


def test_a_second_engine_in_one_process_gets_the_same_cache(monkeypatch):
    """What an earlier engine freed stays in torch's cache, and its peak in
    torch's statistics; neither may shrink the next engine's KV cache."""
    gpu = FakeGPU(total=80 * GiB, outside=3 * GiB)
    gpu.install(monkeypatch)
    budgets = []
    for _ in range(2):
        gpu.alloc(16 * GiB)
        allocator = GPUKVCacheAllocator()
        allocator.profile(lambda: gpu.alloc(5 * GiB) or gpu.free(5 * GiB) or 0)
        budget, _ = allocator.default_budget(CacheConfig(memory_utilization=0.5))
        budgets.append(budget)
        gpu.alloc(budget)  # the KV cache
        gpu.free(budget + 16 * GiB)  # the engine is dropped: torch caches it all
    assert budgets[0] == budgets[1] == 40 * GiB - 21 * GiB - 3 * GiB


def test_without_a_profile_the_live_memory_counts(monkeypatch):
    gpu = FakeGPU(total=24 * GiB, outside=1 * GiB)
    gpu.install(monkeypatch)
    gpu.alloc(8 * GiB)
    gpu.free(2 * GiB)  # e.g. load-time staging, cached
    budget, _ = GPUKVCacheAllocator().default_budget(CacheConfig(memory_utilization=0.9))
    assert budget == int(0.9 * 24 * GiB) - 6 * GiB - 1 * GiB


def test_weights_are_allocated_in_the_model_dtype(tiny_model_dir, monkeypatch):
    """Loading never holds a wider copy of the weights: every parameter is
    created in the model dtype, before the checkpoint is copied in."""
    from pllm import LLM

    created = []
    to_empty = torch.nn.Module.to_empty

    def spy(module, *, device, recurse=True):
        created.extend(p.dtype for p in module.parameters())
        return to_empty(module, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    llm = LLM(tiny_model_dir, device="cpu", dtype="bfloat16", kv_cache_memory="4MiB",
              max_model_len=64)
    model = llm.llm_engine.executor.worker.model
    assert created and set(created) == {torch.bfloat16}
    assert model.rotary.cos.dtype == torch.float32  # rope tables stay fp32, as in transformers


def test_a_full_gpu_says_which_setting_to_change(monkeypatch):
    from pllm.platforms.common.allocator import KVCacheMemoryError

    gpu = FakeGPU(total=24 * GiB, outside=10 * GiB)  # another process holds 10 GiB
    gpu.install(monkeypatch)
    gpu.alloc(8 * GiB)
    with pytest.raises(KVCacheMemoryError, match=r"memory_utilization=0.5 of the GPU's "
                                                 r"24.00 GiB \(12.00 GiB\), less 8.00 GiB .* "
                                                 r"and 10.00 GiB outside torch .* leaves "
                                                 r"-6.00 GiB; raise --memory-utilization"):
        GPUKVCacheAllocator().num_blocks(CacheConfig(memory_utilization=0.5), 1 << 20)
