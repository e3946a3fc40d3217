"""How the host platforms (cpu, ipex) size their KV cache when no size is given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pllm.core.config import CacheConfig
from pllm.platforms.common import allocator as host_allocator
from pllm.platforms.common.allocator import HostKVCacheAllocator, KVCacheMemoryError

GIB = 1 << 30


@pytest.fixture
def ram(monkeypatch):
    """Pretend the host has ``ram.available`` bytes of RAM available."""
    state = SimpleNamespace(available=100 * GIB)
    monkeypatch.setattr(host_allocator.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=state.available))
    return state


def test_default_is_half_the_available_ram_at_most_4_gib(ram):
    allocator = HostKVCacheAllocator()
    assert allocator.num_blocks(CacheConfig(), GIB) == 4
    ram.available = 6 * GIB
    assert allocator.num_blocks(CacheConfig(), GIB // 4) == 12  # 3 GiB in quarter-GiB blocks


def test_memory_utilization_is_of_the_available_ram_and_capped(ram):
    """vLLM users pass --gpu-memory-utilization 0.9 out of habit: on the CPU
    it may not take 90% of a large host's RAM."""
    allocator = HostKVCacheAllocator()
    assert allocator.num_blocks(CacheConfig(gpu_memory_utilization=0.9), GIB) == 4
    ram.available = 2 * GIB
    budget, why = allocator.default_budget(CacheConfig(memory_utilization=0.25))
    assert budget == GIB // 2 and "memory_utilization=0.25" in why


def test_an_explicit_size_wins_and_too_small_a_budget_says_so(ram):
    allocator = HostKVCacheAllocator()
    assert allocator.num_blocks(CacheConfig(kv_cache_memory=10 * GIB), GIB) == 10  # no cap
    with pytest.raises(KVCacheMemoryError, match="kv_cache_memory = 100 bytes holds no"):
        allocator.num_blocks(CacheConfig(kv_cache_memory=100), 4096)
