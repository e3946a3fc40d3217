"""The reference PagedAttention every backend is compared with: sequence by
sequence, in fp32, with an explicit mask. Slow and obvious on purpose.

It keeps K/V in a layout of its own, the reference layout (K and V stacked
in dim 0), which no backend has to share; the checks write the same values
into a backend's cache through its ``write_kv`` and into a reference cache
through :func:`reference_write_kv`::

    ref_cache[0 = K | 1 = V, block, offset_in_block, kv_head, head_dim]

    block_tables[s] = [7, 2, 9]        block_size = 4, seq_len = 10
    positions  0..3 -> block 7, 4..7 -> block 2, 8..9 -> block 9 (offsets 0, 1)
"""

from __future__ import annotations

import torch

from pllm.core.interfaces import AttentionMetadata
from pllm.core.kv_cache.fp8 import dequantize, is_fp8


def reference_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                             head_dim: int) -> tuple[int, ...]:
    """The reference layout's shape for one layer."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def reference_write_kv(
    key: torch.Tensor, value: torch.Tensor, ref_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write into a reference-layout cache ``[2, blocks, block_size, heads, dim]``,
    skipping negative slots: the obvious version backends are compared with."""
    flat = ref_cache.view(2, -1, *ref_cache.shape[3:])
    keep = slots >= 0
    flat[0][slots[keep]] = key[keep].to(ref_cache.dtype)
    flat[1][slots[keep]] = value[keep].to(ref_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int):
    """K and V of one sequence, ``[seq_len, num_kv_heads, head_dim]`` each."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_cache[:, block_table[:num_blocks].long()]  # [2, nb, bs, h, d]
    blocks = blocks.flatten(1, 2)[:, :seq_len]
    return blocks[0], blocks[1]


def reference_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Sequence by sequence, in fp32, with an explicit mask: slow and obvious.
    An 8-bit cache is read as ``k_scale * K``, ``v_scale * V``; ``soft_cap``
    ``c`` turns each scaled score ``s`` into ``c * tanh(s / c)``."""
    num_heads = query.shape[1]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    if not is_fp8(kv_cache.dtype):
        k_scale = v_scale = 1.0
    out = torch.empty_like(query)
    starts = metadata.query_start_loc_cpu
    for s in range(metadata.num_seqs):
        q = query[starts[s] : starts[s + 1]].float()  # [q_len, H, D]
        q_len, seq_len = q.shape[0], metadata.seq_lens_cpu[s]
        k, v = gather_kv(kv_cache, metadata.block_tables[s], seq_len)
        k = dequantize(k, k_scale).repeat_interleave(group, dim=1)
        v = dequantize(v, v_scale).repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[starts[s] : starts[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
