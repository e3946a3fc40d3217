"""Attention on the fake device: pllm's reference math over a cache layout
of its own, so that nothing in pllm can silently rely on one layout.

One layer's cache, block-major with the heads before the offsets::

    kv_cache[block, 0 = K | 1 = V, kv_head, offset_in_block, head_dim]

The reference layout is ``[2, block, offset, kv_head, head_dim]``; a
permuted view of this cache is exactly that, so ``reference_attention``
reads it in place.
"""

from __future__ import annotations

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata
from pllm.core.kv_cache.fp8 import is_fp8, quantize
from pllm.testing.reference import reference_attention


def _as_reference(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[block, 2, head, offset, dim]`` viewed as ``[2, block, offset, head, dim]``."""
    return kv_cache.permute(1, 0, 3, 2, 4)


def _bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache to index into: 8-bit floats through a byte view (the host
    has no indexing kernels for them), anything else as it is."""
    return kv_cache.view(torch.uint8) if is_fp8(kv_cache.dtype) else kv_cache


class FakeAccelAttentionBackend(AttentionBackend):
    name = "fakeaccel"

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return (num_blocks, 2, num_kv_heads, block_size, head_dim)

    def write_kv(self, key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
        block_size = kv_cache.shape[3]
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        blocks, offsets = slots // block_size, slots % block_size
        target = _bytes(kv_cache)
        for i, (x, scale) in enumerate(((key, k_scale), (value, v_scale))):
            x = x[keep]
            if is_fp8(kv_cache.dtype):  # saturating, as the contract asks
                x = quantize(x.float(), scale, kv_cache.dtype).view(torch.uint8)
            else:
                x = x.to(kv_cache.dtype)
            # [tokens, heads, dim] into [block, i, heads, offset, dim]
            target[blocks, i, :, offsets] = x

    def forward(self, query, kv_cache, metadata: AttentionMetadata, *, scale,
                sliding_window=None, k_scale=1.0, v_scale=1.0):
        out = reference_attention(query, _as_reference(kv_cache), metadata, scale=scale,
                                  sliding_window=sliding_window, k_scale=k_scale,
                                  v_scale=v_scale)
        # Padding rows past the last sequence (static shapes) stay zero.
        out[metadata.query_start_loc_cpu[-1]:] = 0
        return out

    def copy_blocks(self, kv_caches, src_to_dst):
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst], device=kv_caches[0].device)
        dst = torch.tensor([d for _, d in src_to_dst], device=kv_caches[0].device)
        for cache in kv_caches:
            target = _bytes(cache)
            target[dst] = target[src]
