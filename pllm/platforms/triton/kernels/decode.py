"""Split-KV decode (flash-decoding): one query token per sequence.

A program handles one (sequence, kv head, split) and all ``group`` query
heads that share the kv head, so each K/V tile is read once per kv head.
The sequence's visible keys (its last ``W`` with a sliding window) are cut
into ``num_splits`` equal partitions; each program writes its partition's
max, sum and normalised output, and a reduce kernel merges them::

    keys  [ split 0 | split 1 | split 2 | split 3 ]     (per sequence)
             m0,l0,o0  m1,l1,o1  ...                    fp32 partials
    out = sum_i 2^(m_i - M) l_i o_i / sum_i 2^(m_i - M) l_i,   M = max_i m_i

With one split the first kernel writes the output directly.
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


@triton.jit(do_not_specialize=["window", "num_splits", "stride_bt"])
def _decode_split_kernel(
    q_ptr, cache_ptr, out_ptr, part_ptr,
    seq_lens_ptr, block_tables_ptr,
    scale_log2, cap_log2, v_scale, window, group, head_dim, num_heads, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_cb, stride_co, stride_ch, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, SINGLE_SPLIT: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    k_lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    part = tl.cdiv(tl.cdiv(seq_len - k_lo, num_splits), BLOCK_N) * BLOCK_N
    k_start = k_lo + split * part
    k_stop = tl.minimum(k_start + part, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    g_ok = offs_g < group
    d_ok = offs_d < head_dim
    heads = kv_head * group + offs_g
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    block_table = block_tables_ptr + seq * stride_bt

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    # Every key in [k_lo, seq_len) is visible to the last position: no causal mask.
    for k0 in range(k_start, k_stop, BLOCK_N):
        k_idx = k0 + offs_n
        k_ok = k_idx < k_stop
        k, v = load_kv_tile(cache_ptr, block_table, k_idx, k_ok, kv_head, offs_d, d_ok,
                            stride_kv, stride_cb, stride_co, stride_ch, BLOCK_SIZE)
        scores = tl.dot(q, k.to(q.dtype), input_precision="ieee") * scale_log2
        if SOFT_CAP:
            scores = soft_capped(scores, cap_log2)
        scores = tl.where(k_ok[None, :], scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, m_i, l_i, acc, v.to(q.dtype))

    # An empty split stores zeros; v_scale dequantizes an 8-bit V (1.0 otherwise).
    acc = acc * (v_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    mask = g_ok[:, None] & d_ok[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # One fp32 row per (seq, head, split): [out (head_dim) | max | sum].
        part_row = part_ptr + ((seq * num_heads + heads) * num_splits + split) * (head_dim + 2)
        tl.store(part_row[:, None] + offs_d[None, :], acc, mask=mask)
        tl.store(part_row + head_dim, m_i, mask=g_ok)
        tl.store(part_row + head_dim + 1, l_i, mask=g_ok)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    out_ptr, part_ptr,
    head_dim, num_heads, num_splits, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < num_splits
    d_ok = offs_d < head_dim
    part_row = part_ptr + ((seq * num_heads + head) * num_splits + offs_s) * (head_dim + 2)
    m = tl.load(part_row + head_dim, mask=s_ok, other=float("-inf"))
    l = tl.load(part_row + head_dim + 1, mask=s_ok, other=0.0)  # noqa: E741 (the softmax denominator, as in the flash papers)
    # Empty splits (m = -inf, l = 0) weigh exactly 0; a padded row with no
    # keys at all (seq_len 0) comes out as zeros rather than NaN.
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.where(l > 0.0, tl.math.exp2(m - m_max) * l, 0.0)
    o = tl.load(part_row[:, None] + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(weight, 0)
    res = tl.sum(o * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d,
             res.to(out_ptr.dtype.element_ty), mask=d_ok)


def choose_num_splits(
    max_seq_len: int,
    num_programs: int,
    *,
    num_sms: int,
    min_partition: int = 256,
    max_splits: int = 64,
) -> int:
    """How many partitions each sequence's context is cut into. Long contexts
    split (each partition keeps at least ``min_partition`` keys so the
    partials stay cheap to merge) until ``num_programs * splits`` covers about
    four waves of the ``num_sms`` multiprocessors; a batch that already fills
    them is not split at all (measured on an H200: 64 seqs x 8 kv heads run
    best unsplit, 8 seqs x 8 kv heads at 8k best with 8 splits, one 32k
    sequence with 64)."""
    by_length = triton.cdiv(max(max_seq_len, 1), min_partition)
    by_occupancy = 4 * num_sms // max(num_programs, 1)
    return max(1, min(by_length, by_occupancy, max_splits))


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    num_seqs: int,
    scale: float,
    num_splits: int,
    sliding_window: int = 0,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    soft_cap: float | None = None,
    config: tuple[int, int, int] | None = None,
) -> None:
    """One query token per sequence for the first ``num_seqs`` sequences:
    row ``n`` of ``query``/``out`` (``[tokens, num_heads, head_dim]``) attends
    to the first ``seq_lens[n]`` cached positions of ``block_tables[n]``
    (later rows are untouched, so a mixed batch needs no slicing). The cache
    is read as ``k_scale * K``, ``v_scale * V``; ``soft_cap`` ``c`` bends each
    scaled score ``s`` into ``c * tanh(s / c)``. ``config`` overrides
    ``(BLOCK_N, num_warps, num_stages)``, for tuning."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    if num_seqs == 0:
        return
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    block_n, num_warps, num_stages = config or ((64 if head_dim_pad <= 128 else 32), 4, 2)
    num_splits = max(1, int(num_splits))
    single = num_splits == 1
    part = out if single else torch.empty(  # unused with one split
        (num_seqs, num_heads, num_splits, head_dim + 2), dtype=torch.float32, device=query.device)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, kv_cache, out, part,
        seq_lens, block_tables,
        scale * k_scale * LOG2E, (soft_cap or 1.0) * LOG2E, v_scale, sliding_window, group,
        head_dim, num_heads, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        BLOCK_SIZE=kv_cache.shape[2], BLOCK_N=block_n,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM_PAD=head_dim_pad, SINGLE_SPLIT=single, SOFT_CAP=soft_cap is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part, head_dim, num_heads, num_splits, out.stride(0), out.stride(1),
            SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM_PAD=head_dim_pad,
        )
