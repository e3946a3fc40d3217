r"""Varlen PagedAttention for prefill chunks (and any query length >= 1).

Grid: (query tiles, query heads). The query tiles of all sequences are laid
end to end; sequence ``s`` owns the tiles starting at
``(query_start_loc[s] - tok_base) // BLOCK_M + s`` (one spare tile per
sequence absorbs the rounding), so a program finds its sequence by binary
search on the device: no host plan, no sync, graph-capturable.

Query token ``t`` of a chunk sits at position ``seq_len - query_len + t`` and
sees keys ``k`` with ``q_pos - W < k <= q_pos`` (``W`` = sliding window,
unbounded when 0), i.e. the cached context plus the causal part of its chunk::

            keys ->  0 ........ context ..... seq_len
    query tile rows  [#######################\      ]
                     [########################\     ]   '#' allowed
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pllm.platforms.triton.kernels.common import (
    LOG2E,
    load_kv_tile,
    online_softmax_step,
    soft_capped,
)


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, tok_base, BLOCK_M: tl.constexpr):
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = (tl.load(qsl_ptr + mid) - tok_base) // BLOCK_M + mid
        if first_tile <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# Batch-dependent scalars (the block-table width included) are not
# specialised on (e.g. "== 1"), so a new batch shape never triggers a recompile.
@triton.jit(do_not_specialize=["seq_base", "num_seqs", "tok_base", "window", "stride_bt"])
def _prefill_kernel(
    q_ptr, cache_ptr, out_ptr,
    qsl_ptr, seq_lens_ptr, block_tables_ptr,
    seq_base, num_seqs, tok_base, scale_log2, cap_log2, v_scale, window, group, head_dim,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_cb, stride_co, stride_ch, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    # Sequences seq_base.. of the batch (the prefills after the decodes).
    qsl_ptr += seq_base
    seq_lens_ptr += seq_base
    block_tables_ptr += seq_base.to(tl.int64) * stride_bt
    seq = _find_seq(qsl_ptr, tile, num_seqs, tok_base, BLOCK_M)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    m0 = (tile - ((q_start - tok_base) // BLOCK_M + seq)) * BLOCK_M
    if m0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len
    kv_head = head // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < q_len
    d_ok = offs_d < head_dim
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = context + offs_m

    # Keys this tile can see: up to its last row's position (causal), and from
    # its first row's window start (rounded down to a whole tile).
    k_end = tl.minimum(seq_len, context + m0 + BLOCK_M)
    k_begin = tl.where(window > 0, tl.maximum(context + m0 - window + 1, 0), 0)
    k_begin = (k_begin // BLOCK_N) * BLOCK_N
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_N):
        k_idx = k0 + offs_n
        k_ok = k_idx < k_end
        k, v = load_kv_tile(cache_ptr, block_table, k_idx, k_ok, kv_head, offs_d, d_ok,
                            stride_kv, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
        scores = tl.dot(q, k.to(q.dtype), input_precision="ieee") * scale_log2
        if SOFT_CAP:
            scores = soft_capped(scores, cap_log2)
        allowed = k_ok[None, :] & (k_idx[None, :] <= q_pos[:, None])
        allowed = allowed & ((window <= 0) | (k_idx[None, :] > q_pos[:, None] - window))
        scores = tl.where(allowed, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, m_i, l_i, acc, v.to(q.dtype))

    acc = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _tile_config(head_dim_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): tiles shrink as head_dim
    and element size grow so K/V tiles fit shared memory."""
    wide = dtype == torch.float32
    if head_dim_pad <= 64:
        return 64, 64, 4, 2
    if head_dim_pad <= 128:
        return (64, 32, 4, 1) if wide else (64, 64, 4, 3)  # 3 stages: ~5% on H200
    return (32, 32, 4, 1) if wide else (64, 32, 8, 2)


def prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    first_seq: int,
    num_seqs: int,
    first_token: int,
    num_query_tokens: int,
    scale: float,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    soft_cap: float | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> None:
    """Attention for sequences ``first_seq .. first_seq + num_seqs`` of the
    batch (e.g. the prefills after the decodes): sequence ``s`` has query rows
    ``query_start_loc[s] .. query_start_loc[s + 1]`` of ``query``/``out``
    (``[tokens, num_heads, head_dim]``). ``first_token`` and
    ``num_query_tokens`` are ``query_start_loc[first_seq]`` and the number of
    their query rows, as host ints (no device sync). The cache is read as
    ``k_scale * K``, ``v_scale * V``; ``soft_cap`` ``c`` bends each scaled
    score ``s`` into ``c * tanh(s / c)``. ``config`` overrides the tile choice ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, for tuning."""
    if num_seqs == 0:
        return
    num_heads, head_dim = query.shape[1], query.shape[2]
    group = num_heads // kv_cache.shape[3]
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = config or _tile_config(head_dim_pad, query.dtype)
    if num_query_tokens == num_seqs and config is None:  # one row per sequence: small tiles
        block_m = 16
    grid = (num_query_tokens // block_m + num_seqs, num_heads)
    _prefill_kernel[grid](
        query, kv_cache, out,
        query_start_loc, seq_lens, block_tables,
        first_seq, num_seqs, first_token, scale * k_scale * LOG2E, (soft_cap or 1.0) * LOG2E,
        v_scale, sliding_window, group, head_dim,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM_PAD=head_dim_pad, SOFT_CAP=soft_cap is not None, num_warps=num_warps,
        num_stages=num_stages,
    )
