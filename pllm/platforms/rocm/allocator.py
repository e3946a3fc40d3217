"""KV-cache memory on an AMD GPU: the shared GPU budget allocator
(``pllm.platforms.triton.allocator``), naming the HIP context in its
messages."""

from __future__ import annotations

from pllm.platforms.triton.allocator import GPUKVCacheAllocator


class RocmKVCacheAllocator(GPUKVCacheAllocator):
    runtime = "HIP"
