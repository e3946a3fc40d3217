"""KV-cache memory on a GPU that torch drives through its ``cuda`` device
type (NVIDIA, and AMD under a ROCm build of torch): the budget comes from
the device's memory as torch's allocator sees it."""

from __future__ import annotations

from typing import ClassVar

import torch

from pllm.core.config import CacheConfig
from pllm.platforms.common.allocator import BudgetKVCacheAllocator, KVCacheMemoryError

DEFAULT_MEMORY_UTILIZATION = 0.9  # as vLLM's --gpu-memory-utilization


class GPUKVCacheAllocator(BudgetKVCacheAllocator):
    """Default budget: what ``memory_utilization`` of the current GPU's
    total memory leaves after this process's peak in torch (weights plus the
    profiling pass's activations; not its throwaway KV cache) and the memory
    torch does not manage (the CUDA context, NCCL buffers, other processes)::

        budget = util * total - peak_allocated - (total - free - reserved)

    torch's cache of freed blocks counts as free: blocks a previous engine in
    the same process released (or a load's staging copies) are returned to
    the driver before measuring, not charged to the KV cache.
    """

    runtime: ClassVar[str] = "GPU"  # named in messages: "CUDA context", "HIP context"

    def __init__(self) -> None:
        self._peak: int | None = None

    def profile(self, forward) -> None:  # noqa: ANN001
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        throwaway_cache = forward()
        torch.cuda.synchronize()
        self._peak = torch.cuda.max_memory_allocated() - throwaway_cache

    def memory_limit(self) -> tuple[int, str]:
        return torch.cuda.mem_get_info()[1], "memory on this GPU"

    def default_budget(self, cache_config: CacheConfig) -> tuple[int, str]:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.memory_allocated() if self._peak is None else self._peak
        util = cache_config.memory_utilization or DEFAULT_MEMORY_UTILIZATION
        budget = int(util * total) - peak - outside_torch
        source = (f"memory_utilization={util:g} of the GPU's {_gib(total)} "
                  f"({_gib(util * total)}), less {_gib(peak)} of weights and activations "
                  f"and {_gib(outside_torch)} outside torch ({self.runtime} context, other processes)")
        if budget <= 0:
            raise KVCacheMemoryError(
                f"no memory left for the KV cache: {source} leaves {_gib(budget)}; raise "
                f"--memory-utilization, free the GPU, or lower --max-num-batched-tokens "
                f"(the activation peak)")
        return budget, source


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"
