"""Writing K/V into the paged cache, and copying whole blocks.

``slot = block * block_size + offset``; a negative slot is padding and is
skipped, so a runner may pad the flat batch without touching the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cb, stride_co, stride_ch,
    num_tokens, num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, TOKENS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    # One program per TOKENS tokens, all heads at once: [TOKENS, HEADS_PAD, HEAD_DIM_PAD].
    t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    block = (slot // BLOCK_SIZE)[:, None, None]
    offset = (slot % BLOCK_SIZE)[:, None, None]
    t = t[:, None, None]
    h = tl.arange(0, HEADS_PAD)[None, :, None]
    d = tl.arange(0, HEAD_DIM_PAD)[None, None, :]
    mask = (slot >= 0)[:, None, None] & (h < num_kv_heads) & (d < head_dim)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = cache_ptr + block * stride_cb + offset * stride_co + h * stride_ch + d
    elem = cache_ptr.dtype.element_ty
    tl.store(dst, k.to(elem), mask=mask)
    tl.store(dst + stride_ckv, v.to(elem), mask=mask)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into
    ``kv_cache`` ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` at
    ``slot_mapping`` (in place, cast to the cache dtype)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    # The kernels address head_dim with unit stride (true for views of a fused
    # QKV projection); anything else is copied once here.
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache needs a contiguous head_dim")
    heads_pad = triton.next_power_of_2(num_kv_heads)
    head_dim_pad = triton.next_power_of_2(head_dim)
    tokens = max(1, min(16, 8192 // (heads_pad * head_dim_pad)))  # ~8K elements a program
    _reshape_and_cache_kernel[(triton.cdiv(num_tokens, tokens),)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_tokens, num_kv_heads, head_dim,
        BLOCK_SIZE=kv_cache.shape[2], TOKENS=tokens, HEADS_PAD=heads_pad,
        HEAD_DIM_PAD=head_dim_pad,
    )


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]]) -> None:
    """Copy whole blocks ``src -> dst`` (K and V) in every layer's cache.
    Plain indexing: one gather/scatter per layer, no kernel needed."""
    if not src_to_dst or not kv_caches:
        return
    device = kv_caches[0].device
    src = torch.tensor([s for s, _ in src_to_dst], dtype=torch.long, device=device)
    dst = torch.tensor([d for _, d in src_to_dst], dtype=torch.long, device=device)
    for cache in kv_caches:
        cache[:, dst] = cache[:, src]
