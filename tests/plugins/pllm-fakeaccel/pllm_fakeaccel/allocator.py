"""The fake device's KV-cache memory: a fixed budget, sized by pllm's
shared byte-budget allocator."""

from __future__ import annotations

from pllm.core.config import CacheConfig
from pllm.platforms.common.allocator import BudgetKVCacheAllocator

# What the fake device "has" for the KV cache when --kv-cache-memory is not
# given: small, so a test engine never takes much host RAM.
DEFAULT_BUDGET = 64 * 2**20


class FakeAccelAllocator(BudgetKVCacheAllocator):
    def default_budget(self, cache_config: CacheConfig) -> tuple[int, str]:
        return DEFAULT_BUDGET, "the fake accelerator's 64 MiB of KV-cache memory"
