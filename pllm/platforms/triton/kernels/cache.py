"""Writing K/V into the paged cache, and copying whole blocks.

``slot = block * block_size + offset``; a negative slot is padding and is
skipped, so a runner may pad the flat batch without touching the cache.
An 8-bit float cache stores ``K / k_scale`` (and ``V / v_scale``)
saturated to the format's largest finite value (``pllm.core.kv_cache.fp8``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pllm.core.kv_cache.fp8 import grid, is_fp8


@triton.jit
def _to_fp8_grid(x, FP8_MAX: tl.constexpr, MIN_EXP: tl.constexpr, MANTISSA: tl.constexpr):
    """``x`` (fp32) saturated to +-FP8_MAX and rounded to the nearest value of
    the 8-bit grid (ties to even), in fp32 arithmetic: the cast that follows
    is then exact, so every Triton target (and the interpreter, whose own
    fp32 -> fp8 cast mis-rounds across binades) stores torch's bits, except
    that zero keeps no sign: the fnuz formats (MI300) have no -0, their 0x80
    is NaN, and no value read back changes."""
    x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, MIN_EXP) - MANTISSA  # the grid step's exponent
    step = ((exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - exp) << 23).to(tl.float32, bitcast=True)
    # |x| / step < 2^(MANTISSA + 1): adding 1.5 * 2^23 rounds it to an integer, ties to even.
    mag = (tl.abs(x) * inv_step + 12582912.0) - 12582912.0
    return tl.where((x < 0) & (mag > 0), -mag, mag) * step


@triton.jit(do_not_specialize=["num_tokens"])
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ckv, stride_cb, stride_co, stride_ch,
    num_tokens, num_kv_heads, head_dim, k_inv_scale, v_inv_scale,
    BLOCK_SIZE: tl.constexpr, TOKENS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, FP8_MAX: tl.constexpr, FP8_MIN_EXP: tl.constexpr,
    FP8_MANTISSA: tl.constexpr,
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
    if FP8_MAX > 0:
        k = _to_fp8_grid(k.to(tl.float32) * k_inv_scale, FP8_MAX, FP8_MIN_EXP, FP8_MANTISSA)
        v = _to_fp8_grid(v.to(tl.float32) * v_inv_scale, FP8_MAX, FP8_MIN_EXP, FP8_MANTISSA)
    tl.store(dst, k.to(elem), mask=mask)
    tl.store(dst + stride_ckv, v.to(elem), mask=mask)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    *, k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Store ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into
    ``kv_cache`` ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` at
    ``slot_mapping`` (in place, cast to the cache dtype; divided by the
    scales and saturated when the cache is fp8)."""
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
    fp8_max, min_exp, mantissa = grid(kv_cache.dtype) if is_fp8(kv_cache.dtype) else (0.0, 0, 0)
    heads_pad = triton.next_power_of_2(num_kv_heads)
    head_dim_pad = triton.next_power_of_2(head_dim)
    tokens = max(1, min(16, 8192 // (heads_pad * head_dim_pad)))  # ~8K elements a program
    _reshape_and_cache_kernel[(triton.cdiv(num_tokens, tokens),)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        num_tokens, num_kv_heads, head_dim, 1.0 / k_scale, 1.0 / v_scale,
        BLOCK_SIZE=kv_cache.shape[2], TOKENS=tokens, HEADS_PAD=heads_pad,
        HEAD_DIM_PAD=head_dim_pad,
        FP8_MAX=fp8_max, FP8_MIN_EXP=min_exp, FP8_MANTISSA=mantissa,
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
        if is_fp8(cache.dtype):  # bytes: index_put has no fp8 kernel everywhere
            cache = cache.view(torch.uint8)
        cache[:, dst] = cache[:, src]
