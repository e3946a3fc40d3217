"""KV-cache memory on an NVIDIA GPU: the shared GPU budget allocator
(``pllm.platforms.triton.allocator``), naming the CUDA context in its
messages."""

from __future__ import annotations

from pllm.platforms.triton.allocator import GPUKVCacheAllocator


class CudaKVCacheAllocator(GPUKVCacheAllocator):
    runtime = "CUDA"
