"""PagedAttention on IPEX's LLM operators (``ipex.llm.modules.PagedAttention``):
K/V written by ``reshape_and_cache``; prefill and chunked-prefill rows
attend through ``flash_attn_varlen_func`` (its causal mask is aligned to the
end of each sequence, so a chunk's queries see the cached context before
them), and so do decode rows, in the same call, unless
``PLLM_IPEX_DECODE_KERNEL=single-query`` sends them to
``single_query_cached_kv_attention`` (slower here: ``DECODE_KERNEL_ENV``).

IPEX's fp8 cache support is partial: its write ignores the scales and
overflows to inf, its attention ignores the scales. pllm writes e5m2 itself
(scaled and saturated, as every backend must) and folds the scales into the
softmax scale and the output.

The operators check nothing: a cache of another layout, a query of other
heads or a slot past the cache writes or reads out of bounds and corrupts
the heap. Every call here checks shapes, dtypes and contiguity first and
raises a ``ValueError`` naming what differs.
"""

from __future__ import annotations

import os

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata
from pllm.core.kv_cache.fp8 import is_fp8, quantize
from pllm.platforms.ipex.runtime import ipex

# Decode rows go through the varlen operator with the rest of the step by
# default: measured on a 2-core AVX2 host (fp32, 9/3 heads of 64, blocks of
# 16), one decode of 1 x 256 tokens took 0.24-0.26 ms against 0.64-1.5 ms for
# the single-query operator, 16 x 512 tokens 4.0 ms against 6.1-8.8 ms; in
# bf16 the two were within 5%. ``single-query`` picks IPEX's decode operator.
DECODE_KERNEL_ENV = "PLLM_IPEX_DECODE_KERNEL"
DECODE_KERNELS = ("varlen", "single-query")


def paged_attention_ops():
    """``ipex.llm.modules.PagedAttention``."""
    return ipex().llm.modules.PagedAttention


class IPEXAttentionBackend(AttentionBackend):
    """Cache layout, as IPEX's operators read it::

        kv_cache[0 = K | 1 = V, block, kv_head, offset_in_block, head_dim]

    so ``kv_cache[0]`` and ``kv_cache[1]`` are the contiguous
    ``[num_blocks, num_kv_heads, block_size, head_dim]`` caches IPEX takes.
    An fp8 cache is e5m2 (the only 8-bit format IPEX's CPU operators store).
    """

    name = "ipex-paged"

    def __init__(self, decode_kernel: str | None = None) -> None:
        self.decode_kernel = decode_kernel or os.environ.get(DECODE_KERNEL_ENV, "varlen")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"{DECODE_KERNEL_ENV}={self.decode_kernel!r}: one of "
                             f"{', '.join(DECODE_KERNELS)}")
        self._ops = paged_attention_ops()
        self._head_mappings: dict[tuple[int, int], torch.Tensor] = {}

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def write_kv(self, key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
        _check_cache(kv_cache)
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (kv_heads, head_dim):
                raise ValueError(f"write_kv: {name} is {tuple(t.shape)}, the cache holds "
                                 f"[tokens, {kv_heads}, {head_dim}]")
            if t.dtype != _compute_dtype(kv_cache.dtype, t.dtype):
                raise ValueError(f"write_kv: {name} is {t.dtype}, the cache {kv_cache.dtype}")
        if slot_mapping.shape != (key.shape[0],) or value.shape[0] != key.shape[0]:
            raise ValueError(f"write_kv: {key.shape[0]} keys, {value.shape[0]} values and "
                             f"{tuple(slot_mapping.shape)} slots")
        if slot_mapping.numel() == 0:
            return
        # IPEX writes every slot it is given: padding (negative) slots are
        # dropped here, and a slot past the cache refused.
        lo, hi = torch.aminmax(slot_mapping)
        if int(hi) >= num_blocks * block_size:
            raise ValueError(f"write_kv: slot {int(hi)} is past the cache's "
                             f"{num_blocks * block_size} slots")
        if int(lo) < 0:
            keep = slot_mapping >= 0
            key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
            if slot_mapping.numel() == 0:
                return
        if is_fp8(kv_cache.dtype):
            # IPEX's write ignores k_scale / v_scale and overflows to inf:
            # pllm's own quantization (scaled, saturated), stored by index.
            blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
            raw = kv_cache.view(torch.uint8)
            raw[0][blocks, :, offsets] = quantize(key, k_scale, kv_cache.dtype).view(torch.uint8)
            raw[1][blocks, :, offsets] = quantize(value, v_scale, kv_cache.dtype).view(torch.uint8)
            return
        self._ops.reshape_and_cache(key.contiguous(), value.contiguous(), kv_cache[0],
                                    kv_cache[1], slot_mapping.to(torch.int32))

    def copy_blocks(self, kv_caches, src_to_dst):
        if not src_to_dst:
            return
        src = torch.tensor([s for s, _ in src_to_dst])
        dst = torch.tensor([d for _, d in src_to_dst])
        for cache in kv_caches:
            cache = cache.view(torch.uint8) if is_fp8(cache.dtype) else cache  # no fp8 indexing
            cache[:, dst] = cache[:, src]

    def prepare_metadata(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """The step's int32 tables and cumulative lengths, once for every
        layer: for the whole batch (one varlen call), and, with the
        single-query decode operator, for the rows after the decodes."""
        md, nd, n = metadata, metadata.num_decodes, metadata.num_seqs
        starts, lens = md.query_start_loc_cpu, md.seq_lens_cpu[:n]
        plan = {"block_tables": md.block_tables[:n].to(torch.int32).contiguous(),
                "seq_lens": md.seq_lens[:n].to(torch.int32).contiguous()}
        plan["all"] = _varlen_args(starts[: n + 1], lens, 0)
        if nd and self.decode_kernel == "single-query":
            plan["max_decode_len"] = max(lens[:nd])
            if nd < n:
                plan["prefill"] = _varlen_args(starts[nd: n + 1], lens[nd:], nd)
        md.extras["ipex"] = plan
        return md

    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None, k_scale=1.0,
                v_scale=1.0, soft_cap=None):
        _check_cache(kv_cache)
        _, _, kv_heads, block_size, head_dim = kv_cache.shape
        tokens, heads, q_dim = query.shape
        if q_dim != head_dim or heads % kv_heads:
            raise ValueError(f"attention: query is {tuple(query.shape)}, the cache holds "
                             f"{kv_heads} KV heads of {head_dim}")
        if query.dtype != _compute_dtype(kv_cache.dtype, query.dtype):
            raise ValueError(f"attention: query is {query.dtype}, the cache {kv_cache.dtype}")
        plan = metadata.extras.get("ipex") or self.prepare_metadata(metadata).extras["ipex"]
        if plan["all"][-1] > tokens:
            raise ValueError(f"attention: the step's sequences span {plan['all'][-1]} query rows, "
                             f"the query has {tokens}")
        query = query.contiguous()
        out = torch.empty_like(query)
        kc, vc = kv_cache[0], kv_cache[1]
        fp8 = is_fp8(kv_cache.dtype)
        if fp8:
            # IPEX's operators read an fp8 cache unscaled: k_scale goes into
            # the softmax scale, v_scale onto the output (both are linear).
            scale = scale * k_scale
        # pllm's window W: a token sees itself and the W - 1 before it. The
        # decode operator takes W, the varlen one the W - 1 to the left.
        window = sliding_window if sliding_window else -1
        left = sliding_window - 1 if sliding_window else -1
        # The soft-cap goes last, and only when set (older IPEX releases lack it).
        cap = () if soft_cap is None else (float(soft_cap),)
        nd, n = metadata.num_decodes, metadata.num_seqs
        # The single-query operator reads no fp8 cache under fp32 queries,
        # and refuses a window together with a soft-cap.
        single = (nd > 0 and self.decode_kernel == "single-query"
                  and not (fp8 and query.dtype != torch.bfloat16)
                  and not (sliding_window and soft_cap is not None))
        varlen = plan.get("prefill") if single else plan["all"]
        if single:
            self._ops.single_query_cached_kv_attention(
                out[:nd], query[:nd], kc, vc, self._head_mapping(heads, kv_heads), float(scale),
                plan["block_tables"][:nd], plan["seq_lens"][:nd], block_size,
                plan["max_decode_len"], None, window, 1.0, 1.0, *cap)
        if varlen is not None:
            cu_q, cu_kv, max_q, max_kv, first, lo, hi = varlen
            self._ops.flash_attn_varlen_func(
                out[lo:hi], query[lo:hi], kc, vc, cu_q, cu_kv, max_q, max_kv, float(scale), True,
                plan["block_tables"][first:n], None, left, -1, "auto", 1.0, 1.0, *cap)
        if fp8 and v_scale != 1.0:
            out.mul_(v_scale)
        return out

    def _head_mapping(self, heads: int, kv_heads: int) -> torch.Tensor:
        """Query head -> its KV head (int32), for the decode operator."""
        key = (heads, kv_heads)
        if key not in self._head_mappings:
            self._head_mappings[key] = torch.arange(kv_heads, dtype=torch.int32).repeat_interleave(
                heads // kv_heads)
        return self._head_mappings[key]


def _varlen_args(starts: list[int], seq_lens: list[int], first: int):
    """``flash_attn_varlen_func``'s lengths for the sequences from ``first``
    on (``starts``: their query start rows and the end), and their rows."""
    lo, hi = starts[0], starts[-1]
    cu_kv = [0]
    for n in seq_lens:
        cu_kv.append(cu_kv[-1] + n)
    q_lens = [b - a for a, b in zip(starts, starts[1:])]
    return (torch.tensor([s - lo for s in starts], dtype=torch.int32),
            torch.tensor(cu_kv, dtype=torch.int32), max(q_lens), max(seq_lens), first, lo, hi)


def _compute_dtype(cache_dtype: torch.dtype, given: torch.dtype) -> torch.dtype:
    """The dtype queries and K/V must have for this cache: the cache's own,
    or, with an fp8 cache, the model's (fp32 or bf16)."""
    if is_fp8(cache_dtype):
        return given if given in (torch.float32, torch.bfloat16) else torch.float32
    return cache_dtype


def _check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(f"the IPEX backend's caches are contiguous [2, blocks, kv_heads, "
                         f"block_size, head_dim]; got {tuple(kv_cache.shape)} "
                         f"(contiguous={kv_cache.is_contiguous()})")
    if kv_cache.dtype not in (torch.float32, torch.bfloat16, torch.float8_e5m2):
        raise ValueError(f"the IPEX backend's caches are fp32, bf16 or fp8 e5m2; got "
                         f"{kv_cache.dtype}")
