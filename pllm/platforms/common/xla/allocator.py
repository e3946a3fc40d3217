"""KV-cache memory on an XLA device. The budget is ``kv_cache_memory`` when
set; else ``memory_utilization`` (default 0.9) of the device's memory as its
runtime reports it, less what is already in use (the weights). A runtime
that reports none (XLA's CPU backend) gets the host's policy: half the free
RAM, at most 4 GiB."""

from __future__ import annotations

import psutil
import torch

from pllm.core.config import CacheConfig
from pllm.platforms.common.allocator import BudgetKVCacheAllocator
from pllm.platforms.common.xla import runtime

HOST_MAX_BYTES = 4 << 30


class XLAKVCacheAllocator(BudgetKVCacheAllocator):
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def default_budget(self, cache_config: CacheConfig) -> tuple[int, str]:
        util = cache_config.memory_utilization
        memory = runtime.memory_limit(self.device)
        if memory is not None:
            limit, used = memory
            util = 0.9 if util is None else util
            budget = max(0, int(limit * util) - used)
            return budget, (f"memory_utilization={util:g} of the device's {limit} bytes, "
                            f"less {used} bytes in use")
        available = psutil.virtual_memory().available
        frac = 0.5 if util is None else util
        budget = min(int(available * frac), HOST_MAX_BYTES)
        return budget, (f"min({frac:g} of the {available} bytes of available host RAM, "
                        f"{HOST_MAX_BYTES} bytes): the XLA runtime reports no device memory")

    def allocate(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> list[torch.Tensor]:
        caches = super().allocate(num_layers, shape, dtype, device)
        runtime.sync()  # materialise the zeros now, not inside the first step's program
        return caches
