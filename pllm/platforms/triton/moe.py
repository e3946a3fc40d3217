"""The GPU platforms' mixture of experts: every MoE block's experts run
through the Triton grouped GEMM (``kernels/moe.py``) in place of
:func:`pllm.models.moe.grouped_experts`.

The alignment step lives here, in plain torch, so that it runs (and is
tested) without triton. It groups the step's ``T * k`` (token, slot) pairs
by expert and pads each group to a multiple of ``BLOCK_M``, so that every
M-block of the kernels belongs to one expert::

    pairs   p = t * k + slot          ids.reshape(-1)[p] = its expert
    sorted_ids  | e0 e0 e0 -- | e2 e2 e2 e2 | e2 -- -- -- | -- ...   (-- = num_pairs)
    block_expert|     0       |      2      |      2      | -1 ...
                 <- BLOCK_M ->               num_padded ^

An expert that received no pair gets no block. All sizes follow from the
shapes alone (at most ``T*k + min(T*k, E) * (BLOCK_M - 1)`` rows) and
nothing is read back to the host, so the step can be captured in a CUDA
graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pllm.models.moe import MoEBlock

# Pairs per launch: bounds the [pairs, I] and [pairs, H] intermediates of a
# long prefill (vLLM chunks the same way).
MAX_PAIRS_PER_LAUNCH = 32768


class AlignedPairs(NamedTuple):
    """The kernels' view of one routing (all on the routing's device)."""

    sorted_ids: torch.Tensor  # [capacity] int32: pair ids by expert; num_pairs pads
    block_expert: torch.Tensor  # [capacity // block_m] int32: the M-block's expert, -1 if unused
    num_padded: torch.Tensor  # [1] int32: rows in use (a multiple of block_m)


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The rows an alignment of ``num_pairs`` pairs can need at most: each
    expert that received pairs (at most ``min(num_pairs, E)`` of them) pads
    by up to ``block_m - 1``."""
    rows = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_block_size(ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """Groups the pairs of ``ids`` ``[T, k]`` by expert, each group padded
    to a multiple of ``block_m`` (see the module docstring). Within a group
    the pairs keep their order. No host sync: the output sizes depend only
    on the shape of ``ids``."""
    flat = ids.reshape(-1).to(torch.int64)
    num_pairs, device = flat.numel(), flat.device
    # scatter_add_, not bincount: bincount reads its maximum back to the host.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat.index_select(0, order)
    first = torch.cumsum(counts, 0) - counts  # each group's first index in `order`
    rank = torch.arange(num_pairs, device=device) - first.index_select(0, expert_of)
    capacity = max_padded_rows(num_pairs, num_experts, block_m)
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    dest = (ends - padded).index_select(0, expert_of) + rank
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    # The expert whose padded range holds each block's first row: the first
    # e with ends[e] > start (empty experts have ends[e] == ends[e - 1]).
    starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(ends, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return AlignedPairs(sorted_ids, block_expert, ends[-1:].to(torch.int32))


def triton_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   weights: torch.Tensor, ids: torch.Tensor, *, config=None) -> torch.Tensor:
    """:func:`pllm.models.moe.grouped_experts` on the Triton grouped GEMM:
    the same contract (``x`` ``[T, H]``, ``w13`` ``[E, 2I, H]`` gate rows
    then up rows, ``w2`` ``[E, H, I]``, ``weights``/``ids`` ``[T, k]``),
    the result in ``x``'s dtype. ``config`` (a ``kernels.moe.MoEConfig``)
    is optional, defaults to the tile-size heuristic."""
    _check(x, w13, w2, weights, ids)
    num_tokens, top_k = ids.shape
    step = max(1, MAX_PAIRS_PER_LAUNCH // top_k)
    if num_tokens <= step:
        return _launch(x, w13, w2, weights, ids, config)
    out = torch.empty_like(x)
    for start in range(0, num_tokens, step):  # host ints only, no sync
        rows = slice(start, start + step)
        out[rows] = _launch(x[rows], w13, w2, weights[rows], ids[rows], config)
    return out


def _launch(x, w13, w2, weights, ids, config) -> torch.Tensor:
    """One alignment and one pass of the kernels."""
    if x.shape[0] == 0:
        return torch.empty_like(x)
    from pllm.platforms.triton.kernels.moe import choose_config, fused_experts

    num_experts = w13.shape[0]
    config = config or choose_config(ids.numel(), num_experts)
    aligned = align_block_size(ids, num_experts, config.block_m)
    return fused_experts(x, w13, w2, weights, aligned, config)


def _check(x, w13, w2, weights, ids) -> None:
    """Errors a caller can cause, named with the offending shapes."""
    num_experts, two_i, hidden = w13.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_i % 2:
        raise ValueError(f"x {tuple(x.shape)} and w13 {tuple(w13.shape)} do not match "
                         "([T, H] and [E, 2 * I, H])")
    if tuple(w2.shape) != (num_experts, hidden, two_i // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} is not [E, H, I] = "
                         f"{(num_experts, hidden, two_i // 2)}")
    if ids.shape != weights.shape or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both "
                         f"be [T, k] with T = {x.shape[0]}")
    if not (x.dtype == w13.dtype == w2.dtype):
        raise ValueError(f"x, w13 and w2 need one dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}")


def use_triton_moe(model: torch.nn.Module) -> torch.nn.Module:
    """Points every :class:`~pllm.models.moe.MoEBlock` of ``model`` at
    :func:`triton_experts` (the hook the block documents); returns the model."""
    for module in model.modules():
        if isinstance(module, MoEBlock):
            module.experts_fn = triton_experts
    return model
