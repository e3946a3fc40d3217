"""KV-cache memory on the host: how many blocks fit, and the zeroed tensors.

The budget is ``cache_config.kv_cache_memory`` when set, else a fraction of
the RAM that is available *after* the model was loaded (the engine asks once
the weights are in memory), so the cache never pushes the host into swap.
"""

from __future__ import annotations

import psutil

from pllm.core.config import CacheConfig
from pllm.platforms.common.allocator import BudgetKVCacheAllocator, KVCacheMemoryError

__all__ = ["CPUKVCacheAllocator", "KVCacheMemoryError"]


class CPUKVCacheAllocator(BudgetKVCacheAllocator):
    """Default budget: ``memory_utilization`` of the RAM available after the
    model is loaded (psutil) when the config gives one, else
    ``memory_fraction`` of it; at most ``max_bytes`` either way (4 GiB, as
    vLLM's CPU default): zeroing a cache of most of the host's RAM would slow
    start-up for capacity few workloads use, and a habitual
    ``--gpu-memory-utilization 0.9`` must not push the host into swap. A
    larger cache is asked for by size, with ``kv_cache_memory``."""

    def __init__(self, memory_fraction: float = 0.5, max_bytes: int = 4 << 30) -> None:
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.memory_fraction = memory_fraction
        self.max_bytes = max_bytes

    def default_budget(self, cache_config: CacheConfig) -> tuple[int, str]:
        available = psutil.virtual_memory().available
        util = cache_config.memory_utilization
        if util is not None:
            budget = min(int(available * util), self.max_bytes)
            return budget, (f"min(memory_utilization={util:g} of the {available} bytes of "
                            f"available RAM, {self.max_bytes} bytes)")
        budget = min(int(available * self.memory_fraction), self.max_bytes)
        return budget, (f"min({self.memory_fraction:g} of the {available} bytes of available RAM, "
                        f"{self.max_bytes} bytes)")
