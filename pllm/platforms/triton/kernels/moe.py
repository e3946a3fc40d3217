"""Grouped GEMM for mixture-of-experts blocks (the fused-MoE scheme).

The pairs arrive grouped by expert and padded to whole M-blocks
(``pllm.platforms.triton.moe.align_block_size``), so each program owns one
(M-block, N-block) of one expert: it gathers its rows of the input and
multiplies them by one tile of that expert's weights. Programs of the same
N-block and expert run next to each other (M is the fast grid axis), so a
weight tile comes from memory once per expert and then from L2.

    _gate_up_kernel  act[p]    = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)
    _down_kernel     part[p]   = weights[p] * act[p] @ w2[e].T
    (torch)          out[t]    = sum over the k slots of part[t * k + slot]

with ``p = t * k + slot`` a pair and ``e`` its expert. Each pair is written
by exactly one program per N-block and the k slots are summed by torch, so
the result is deterministic (no atomics). Blocks past the used rows
(``block_expert == -1``) return at once. Accumulation is fp32; ``act`` and
the partial products are stored in the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoEConfig:
    """Tile sizes (each a power of two, at least 16 for ``tl.dot``)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def choose_config(num_pairs: int, num_experts: int) -> MoEConfig:
    """Few rows per expert (decode): small M-blocks waste little padding and
    a deep K tile keeps the weight stream wide. Many rows (prefill): larger
    M-blocks read each weight tile for more rows. Depends only on shapes,
    so a captured graph and its replays agree."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=64)
    if rows_per_expert <= 64:
        return MoEConfig(block_m=32, block_n=64, block_k=64)
    return MoEConfig(block_m=64, block_n=64, block_k=32)


@triton.jit
def _block_rows(sorted_ids_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """This M-block's pair ids and which of them are real (not padding)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + rows)
    return pair, pair < num_pairs


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(
    x_ptr, w_ptr, act_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, hidden, inter,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_ap, stride_ai,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    pair, row_ok = _block_rows(sorted_ids_ptr, num_pairs, BLOCK_M)
    token = (pair // TOP_K).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None] * stride_xt
    w_gate = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
    w_up = w_gate + inter * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < hidden
        a = tl.load(x_rows + kk[None, :] * stride_xh, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_gate + kk[:, None] * stride_wh, mask=w_mask, other=0.0)
        wu = tl.load(w_up + kk[:, None] * stride_wh, mask=w_mask, other=0.0)
        gate = tl.dot(a, wg, gate, input_precision="ieee")
        up = tl.dot(a, wu, up, input_precision="ieee")
    act = gate / (1.0 + tl.exp(-gate)) * up
    dst = act_ptr + pair.to(tl.int64)[:, None] * stride_ap + offs_n[None, :] * stride_ai
    tl.store(dst, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(
    act_ptr, w_ptr, part_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, hidden, inter,
    stride_ap, stride_ai, stride_we, stride_wh, stride_wi, stride_pp, stride_ph,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.load(block_expert_ptr + tl.program_id(0))
    if expert < 0:
        return
    pair, row_ok = _block_rows(sorted_ids_ptr, num_pairs, BLOCK_M)
    pair64 = pair.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + pair64[:, None] * stride_ap
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < inter
        a = tl.load(a_rows + kk[None, :] * stride_ai, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wi, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc, input_precision="ieee")
    scale = tl.load(weights_ptr + pair64, mask=row_ok, other=0.0).to(tl.float32)
    acc = acc * scale[:, None]
    dst = part_ptr + pair64[:, None] * stride_pp + offs_n[None, :] * stride_ph
    tl.store(dst, acc.to(part_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  aligned, config: MoEConfig) -> torch.Tensor:
    """The experts' weighted sum ``[T, H]`` for ``x`` ``[T, H]`` and the
    routing ``weights`` ``[T, k]`` whose pairs ``aligned`` (an
    ``AlignedPairs`` built with ``config.block_m``) holds."""
    num_tokens, top_k = weights.shape
    num_pairs = num_tokens * top_k
    hidden, inter = x.shape[1], w2.shape[2]
    num_blocks = aligned.block_expert.numel()
    flat_weights = weights.reshape(-1)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, config.block_n))](
        x, w13, act, aligned.sorted_ids, aligned.block_expert,
        num_pairs, hidden, inter,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        TOP_K=top_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps,
    )
    part = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(num_blocks, triton.cdiv(hidden, config.block_n))](
        act, w2, part, flat_weights, aligned.sorted_ids, aligned.block_expert,
        num_pairs, hidden, inter,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        part.stride(0), part.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    if top_k == 1:
        return part
    # torch sums half precision in fp32 and casts once; the order is fixed.
    return part.view(num_tokens, top_k, hidden).sum(dim=1)
