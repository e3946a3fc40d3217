"""The XLA platforms' attention backend: one cache layout (K and V
interleaved, plus a padding page), one static-shape KV scatter, and two ways
to attend: the Pallas ragged paged-attention kernel (TPU) or the pure-torch
paged attention (anywhere else: XLA's CPU backend, Neuron until an NKI
kernel plugs in through ``kernel``)."""

from __future__ import annotations

import logging

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata
from pllm.platforms.common.xla import paged
from pllm.platforms.common.xla.pallas import KernelFit, RaggedKernel, kernel_fit, ragged_attention

logger = logging.getLogger("pllm")


class XLAPagedAttention(AttentionBackend):
    """``kernel`` None: the torch path. Otherwise a ragged paged-attention
    kernel with torch-xla's signature (:mod:`.pallas`); the cache is then
    allocated at the shapes the kernel accepts (``kernel_fit``)."""

    name = "xla-paged"

    def __init__(self, kernel: RaggedKernel | None = None, *, kernel_name: str = "torch",
                 cache_dtype: torch.dtype = torch.float32,
                 gather_budget: int = paged.GATHER_BUDGET) -> None:
        self.kernel = kernel
        self.cache_dtype = cache_dtype
        self.gather_budget = gather_budget
        self.kernel_name = kernel_name if kernel is not None else "torch"
        self.fit: KernelFit | None = None
        self.block_size = 16  # set by kv_cache_shape: the engine's block (page) size

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        self.block_size = block_size
        if self.kernel is not None:
            fit = kernel_fit(num_kv_heads, head_dim, self.cache_dtype)
            if fit.head_blocks > 1:
                logger.warning(
                    "%s would split %d KV heads (%s) into %d head blocks, which is not verified "
                    "(wrong under jax's interpreter): running the torch paged attention instead",
                    self.kernel_name, fit.num_kv_heads, self.cache_dtype, fit.head_blocks)
                self.kernel, self.kernel_name, self.fit = None, "torch", None
                return paged.xla_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
            if fit.padded and fit != self.fit:
                logger.info("%s: %s", self.kernel_name, fit.describe())
            self.fit = fit
            num_kv_heads, head_dim = self.fit.num_kv_heads, self.fit.head_dim
        return paged.xla_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, **_scales) -> None:
        paged.write_kv(key, value, kv_cache, slot_mapping, self.block_size)

    def block_storage(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """Every page but the last, the padding page."""
        return kv_cache[: kv_cache.shape[0] - self.block_size]

    def prepare_metadata(self, metadata: AttentionMetadata) -> AttentionMetadata:
        if self.kernel is None:
            metadata.extras["tokens"] = paged.TokenMap.build(
                metadata.num_tokens, metadata.query_start_loc, metadata.seq_lens,
                metadata.block_tables)
        return metadata

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                *, scale: float, sliding_window: int | None = None,
                soft_cap: float | None = None, **_scales) -> torch.Tensor:
        if self.kernel is not None:
            kv_pages = paged.pages(kv_cache, metadata.block_size)
            return ragged_attention(self.kernel, self.fit, query, kv_pages, metadata.seq_lens,
                                    metadata.block_tables, metadata.query_start_loc,
                                    scale=scale, sliding_window=sliding_window,
                                    soft_cap=soft_cap)
        # Metadata prepared before kv_cache_shape routed the kernel away has no token map yet.
        tokens = metadata.extras.get("tokens") or self.prepare_metadata(metadata).extras["tokens"]
        return paged.paged_attention(query, kv_cache, tokens, metadata.block_size, scale=scale,
                                     sliding_window=sliding_window, soft_cap=soft_cap,
                                     gather_budget=self.gather_budget)

    def copy_blocks(self, kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]]) -> None:
        paged.copy_blocks(kv_caches, src_to_dst, self.block_size)
