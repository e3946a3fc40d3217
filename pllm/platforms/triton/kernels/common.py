"""Pieces shared by the prefill and decode kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def soft_capped(scores, cap):
    """``cap * tanh(scores / cap)`` (``tanh(x) = 2 sigmoid(2x) - 1``: the
    language has no tanh that also runs under the interpreter). In the
    kernels' base-2 domain ``cap`` is the soft-cap times log2(e)."""
    return cap * (2.0 * tl.sigmoid(2.0 * scores / cap) - 1.0)


@triton.jit
def load_kv_tile(
    cache_ptr, block_table_ptr, k_idx, k_ok, kv_head, offs_d, d_ok,
    stride_kv, stride_cb, stride_co, stride_ch,
    BLOCK_SIZE: tl.constexpr,
):
    """K as ``[HEAD_DIM_PAD, BLOCK_N]`` (ready for ``q @ k``) and V as
    ``[BLOCK_N, HEAD_DIM_PAD]`` for the key positions ``k_idx``. Each position
    finds its physical block through the block table, so a tile may span
    several cache blocks and BLOCK_N does not depend on the block size."""
    block = tl.load(block_table_ptr + k_idx // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    row = block * stride_cb + (k_idx % BLOCK_SIZE) * stride_co + kv_head * stride_ch
    k = tl.load(cache_ptr + row[None, :] + offs_d[:, None],
                mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    v = tl.load(cache_ptr + stride_kv + row[:, None] + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    return k, v


@triton.jit
def online_softmax_step(scores, m_i, l_i, acc, v):
    """Fold one tile of base-2 ``scores`` (``-inf`` where masked) into the
    running max ``m_i``, sum ``l_i`` and output ``acc`` (all fp32). Rows
    with nothing allowed yet keep ``m_i = -inf`` without producing NaNs."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


def check_inputs(query: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Errors a caller can cause, named with the offending values."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            "kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {kv_cache.shape[4]}")
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("query and kv_cache need a contiguous head_dim")
