"""The memory-budget KV-cache allocator any plugin may build on: it turns a
byte budget into a number of blocks and allocates zeroed per-layer tensors;
a subclass says what the default budget is on its device. The host one
(``HostKVCacheAllocator``) is here too, for every platform whose cache lives
in host memory (cpu, ipex).
"""

from __future__ import annotations

import psutil
import torch

from pllm.core.config import CacheConfig
from pllm.core.interfaces import KVCacheAllocator


class KVCacheMemoryError(ValueError):
    """The memory budget holds no block; the message names budget and block size."""


class BudgetKVCacheAllocator(KVCacheAllocator):
    """Sizes the cache from a byte budget; subclasses say what the default
    budget is on their device. The CPU and GPU allocators are such subclasses."""

    def num_blocks(self, cache_config: CacheConfig, bytes_per_block: int) -> int:
        if bytes_per_block <= 0:
            raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
        if cache_config.kv_cache_memory is not None:
            budget, source = cache_config.kv_cache_memory, "kv_cache_memory"
            self._check_fits(budget)
        else:
            budget, source = self.default_budget(cache_config)
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise KVCacheMemoryError(
                f"{source} = {budget} bytes holds no KV-cache block of {bytes_per_block} bytes; "
                f"give at least {bytes_per_block} bytes (kv_cache_memory) or fewer layers/heads"
            )
        return num_blocks

    def default_budget(self, cache_config: CacheConfig) -> tuple[int, str]:
        """Bytes for the cache when ``kv_cache_memory`` is unset, and a phrase
        naming where the number came from (for error messages)."""
        raise NotImplementedError

    def memory_limit(self) -> tuple[int, str] | None:
        """The most bytes a ``kv_cache_memory`` can have on this device, and
        what they are ("RAM available on this host"); optional, defaults to
        None: no check."""
        return None

    def _check_fits(self, budget: int) -> None:
        # Refused here, before allocating: past the limit torch fails deep
        # in an allocation (or the host swaps) only after the model loaded.
        limit = self.memory_limit()
        if limit is not None and budget > limit[0]:
            raise KVCacheMemoryError(
                f"--kv-cache-memory {_gib(budget)} is more than the {_gib(limit[0])} of "
                f"{limit[1]}; give less, or leave it out for the platform's default"
            )

    def allocate(
        self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


class HostKVCacheAllocator(BudgetKVCacheAllocator):
    """KV-cache memory on the host. The budget is ``kv_cache_memory`` when
    set; else ``memory_utilization`` of the RAM available after the model is
    loaded (psutil) when the config gives one, else ``memory_fraction`` of it; at most ``max_bytes`` either way (4 GiB, as
    vLLM's CPU default): zeroing a cache of most of the host's RAM would slow
    start-up for capacity few workloads use, and a habitual
    ``--gpu-memory-utilization 0.9`` must not push the host into swap. A
    larger cache is asked for by size, with ``kv_cache_memory``, up to the
    RAM available."""

    def __init__(self, memory_fraction: float = 0.5, max_bytes: int = 4 << 30) -> None:
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.memory_fraction = memory_fraction
        self.max_bytes = max_bytes

    def memory_limit(self) -> tuple[int, str]:
        return psutil.virtual_memory().available, "RAM available on this host"

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


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"
