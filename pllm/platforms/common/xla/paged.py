"""PagedAttention over the XLA platforms' cache layout, in plain torch, with
static shapes: what runs wherever the Pallas kernel does not (XLA's CPU
backend, Neuron until an NKI kernel exists). Nothing here imports torch_xla;
it runs (and is tested) on ordinary CPU tensors too.

The layout is the one torch-xla's ragged paged-attention kernel reads, K and
V interleaved along the head axis, stored flat by slot::

    kv_cache[page * page_size + offset, 2 * kv_head + 0 | 1, dim]   (0: K, 1: V)
    pages 0 .. num_blocks - 1: the engine's blocks; page num_blocks: padding
    pages(kv_cache, page_size): the kernel's [pages, page_size, 2 * kv_heads, dim] view

The extra last page is where padding tokens (slot -1) write, so that a
padded step's scatter keeps its shape and never touches a live block. The
cache is kept flat because XLA updates a buffer in place (input/output
aliasing) only when the in-place op is on the tensor itself: the same
``index_copy_`` through a ``view`` made XLA copy the whole cache every step
(0.4 s per step for a 1 GiB cache on the CPU backend, against 3 ms).

Every shape below is a function of the step's *bucketed* sizes (tokens,
sequences, block-table width), never of its real lengths: the lengths are
data (``query_start_loc``, ``seq_lens``) masked in, so one compiled program
serves every step of a bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# At most this many cache elements are gathered per chunk of the context
# (token-major: [tokens, chunk positions, 2 * kv_heads, head_dim]); longer
# contexts are walked chunk by chunk with an online softmax.
GATHER_BUDGET = 1 << 24


def xla_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, int, int]:
    """One layer's cache: the engine's ``num_blocks`` pages plus the padding
    page, slot by slot."""
    return ((num_blocks + 1) * block_size, 2 * num_kv_heads, head_dim)


def pages(kv_cache: torch.Tensor, block_size: int) -> torch.Tensor:
    """The cache as ``[pages, page_size, 2 * kv_heads, head_dim]`` (a view, for reading)."""
    return kv_cache.view(-1, block_size, *kv_cache.shape[1:])


def padding_slots(num_tokens: int, kv_cache: torch.Tensor, block_size: int,
                  device: torch.device) -> torch.Tensor:
    """Slots in the padding page (the last), one per token, cycling through it."""
    return kv_cache.shape[0] - block_size + torch.arange(num_tokens, device=device) % block_size


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, block_size: int) -> None:
    """``key``/``value`` ``[tokens, kv_heads, d]`` into their slots with one
    ``index_copy_`` over the flat slots (a static-shape scatter); negative
    slots go to the padding page. A cache padded for the kernel (more KV
    heads, a wider head_dim than the model's) gets zeros in the padding."""
    _, combined, width = kv_cache.shape
    tokens, num_kv, dim = key.shape
    slots = torch.where(slot_mapping < 0,
                        padding_slots(tokens, kv_cache, block_size, slot_mapping.device),
                        slot_mapping)
    kv = torch.stack((key, value), dim=2)  # [T, kv, 2, d]: K and V of a head side by side
    if combined != 2 * num_kv or width != dim:  # a cache padded for the kernel: zeros
        kv = torch.nn.functional.pad(kv, (0, width - dim, 0, 0, 0, combined // 2 - num_kv))
    kv_cache.index_copy_(0, slots, kv.reshape(tokens, combined, width).to(kv_cache.dtype))


@dataclass
class TokenMap:
    """Per flat token of a step, on the device: its sequence, its absolute
    position and whether it is real (not padding). Built once per step
    (``XLAPagedAttention.prepare_metadata``) and shared by every layer."""

    seq: torch.Tensor  # long [T]
    position: torch.Tensor  # long [T]
    valid: torch.Tensor  # bool [T]
    tables: torch.Tensor  # long [T, W]: the token's sequence's block table

    @classmethod
    def build(cls, num_tokens: int, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor) -> TokenMap:
        device = query_start_loc.device
        tok = torch.arange(num_tokens, device=device)
        ends = query_start_loc[1:].long()
        # Token t belongs to the first sequence whose end lies past it: a
        # [T, S] comparison, not a search (static shapes, XLA-friendly).
        seq = (tok.unsqueeze(1) >= ends.unsqueeze(0)).sum(-1).clamp(max=ends.shape[0] - 1)
        valid = tok < query_start_loc[-1].long()
        position = seq_lens.long()[seq] - (ends[seq] - tok)
        position = torch.where(valid, position, torch.zeros_like(position))
        return cls(seq, position, valid, block_tables.long()[seq])


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, tokens: TokenMap,
                    block_size: int, *, scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, gather_budget: int = GATHER_BUDGET) -> torch.Tensor:
    """Attention of ``query`` ``[T, H, d]`` against the paged cache, in fp32.

    Token-major: each token gathers its own sequence's context, chunk by
    chunk of the block table (so memory is bounded by ``gather_budget``
    whatever ``max_model_len``), with a running max and sum (online softmax).
    Rows of padding tokens come out zero. The query's heads and head_dim
    are the cache's (a model's own; under the kernel fit, the padded ones)."""
    num_tokens, num_heads, dim = query.shape
    _, combined, _ = kv_cache.shape
    num_kv = combined // 2
    paged = pages(kv_cache, block_size)
    group = num_heads // num_kv
    width = tokens.tables.shape[1]
    per_block = num_tokens * block_size * combined * kv_cache.shape[-1]
    chunk = max(1, min(width, gather_budget // max(per_block, 1)))
    q = query.float().view(num_tokens, num_kv, group, dim) * scale
    pos = tokens.position.unsqueeze(1)
    running_max = torch.full((num_tokens, num_kv, group), float("-inf"), device=query.device)
    total = torch.zeros((num_tokens, num_kv, group), device=query.device)
    acc = torch.zeros((num_tokens, num_kv, group, dim), device=query.device)
    for first in range(0, width, chunk):
        blocks = tokens.tables[:, first:first + chunk]  # [T, n]
        kv = paged[blocks].float()  # [T, n, bs, 2 * kv, width]
        kv = kv.reshape(num_tokens, -1, num_kv, 2, dim)
        key, value = kv[..., 0, :], kv[..., 1, :]  # [T, C, kv, d]
        ctx = first * block_size + torch.arange(key.shape[1], device=query.device)
        allowed = (ctx.unsqueeze(0) <= pos) & tokens.valid.unsqueeze(1)
        if sliding_window is not None:
            allowed &= ctx.unsqueeze(0) > pos - sliding_window
        scores = torch.einsum("tkgd,tckd->tkgc", q, key)
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(-1))
        # A row with nothing allowed yet keeps max -inf: shift by 0 there, not by -inf.
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(scores - shift.unsqueeze(-1))
        keep = torch.exp(running_max - shift)
        total = total * keep + probs.sum(-1)
        acc = acc * keep.unsqueeze(-1) + torch.einsum("tkgc,tckd->tkgd", probs, value)
        running_max = new_max
    out = acc / total.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return out.reshape(num_tokens, num_heads, dim).to(query.dtype)


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]],
                block_size: int) -> None:
    """Whole pages ``src -> dst`` in every layer (copy-on-write), one
    ``index_copy_`` of their slots per layer."""
    if not src_to_dst:
        return
    device = kv_caches[0].device
    offsets = torch.arange(block_size)
    src = torch.cat([s * block_size + offsets for s, _ in src_to_dst]).to(device)
    dst = torch.cat([d * block_size + offsets for _, d in src_to_dst]).to(device)
    for cache in kv_caches:
        cache.index_copy_(0, dst, cache[src])
