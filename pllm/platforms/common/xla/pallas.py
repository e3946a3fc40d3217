"""The Pallas ragged paged-attention kernel torch-xla ships for TPUs
(``torch_xla.experimental.custom_kernel.ragged_paged_attention``), fitted to
pllm's models.

The kernel reads the same cache layout as :mod:`.paged` (K and V
interleaved, ``[pages, page_size, 2 * kv_heads, head_dim]``) and takes the
step as ``kv_lens``, ``page_indices``, ``cu_q_lens`` and ``num_seqs``, all
static-shaped. It accepts only some shapes:

* ``head_dim`` a multiple of 128 (its lanes);
* ``2 * kv_heads`` that XLA tiles fully: 2, 4, 8 or a multiple of 8 in fp32,
  and in packed bf16 ``kv_heads`` of 1, 2, 4, 8 or a multiple of 8.

The kernel also splits the heads into blocks of at most ``8 x packing``
combined heads (packing: 1 in fp32, 2 in bf16): 8 KV heads in fp32 make two
blocks. Under jax's interpreter every head past the first block comes out
wrong (tests/platforms/xla/test_pallas_interpret.py keeps that as a strict
expected failure); until that is understood on a TPU, such a model runs the
torch paged attention instead, and the platform logs why
(:attr:`KernelFit.head_blocks`).

Other models are *padded* to fit: the cache is allocated with the padded
head_dim and KV-head count (zeros in the padding), queries get zero
dimensions and, per padded KV head, zero query heads, and the output is cut
back. SmolLM2-135M (head_dim 64, 3 KV heads, 9 query heads) runs as head_dim
128, 4 KV heads, 12 query heads: its cache takes 128 * 4 / (64 * 3) = 2.67x
the memory. :func:`kernel_fit` says what was padded, and the platform logs it.

Nothing here imports torch_xla or jax: the kernel is passed in, so the same
adapter drives the real kernel on a TPU and the kernel under jax's
interpreter in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LANES = 128  # the kernel's head_dim must be a multiple of this

# kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
#        sliding_window, soft_cap) -> [tokens, heads, head_dim]
RaggedKernel = Callable[..., torch.Tensor]


def _tiles(kv_heads: int) -> bool:
    """Whether ``2 * kv_heads`` combined heads tile fully, in fp32 and in bf16."""
    return kv_heads in (1, 2, 4, 8) or kv_heads % 8 == 0


@dataclass(frozen=True)
class KernelFit:
    """The shapes the kernel runs a model at, and why they differ from the model's."""

    num_kv_heads: int
    head_dim: int
    model_kv_heads: int
    model_head_dim: int
    cache_dtype: torch.dtype = torch.float32

    @property
    def head_blocks(self) -> int:
        """How many head blocks the kernel splits the combined KV heads into."""
        tiling = 8 * max(1, 4 // self.cache_dtype.itemsize)
        combined = 2 * self.num_kv_heads
        return combined // tiling if combined % tiling == 0 else 1

    @property
    def padded(self) -> bool:
        return (self.num_kv_heads, self.head_dim) != (self.model_kv_heads, self.model_head_dim)

    @property
    def memory_factor(self) -> float:
        """Cache bytes per token, padded over unpadded."""
        return (self.num_kv_heads * self.head_dim) / (self.model_kv_heads * self.model_head_dim)

    def describe(self) -> str:
        if not self.padded:
            return "the model's shapes fit the kernel as they are"
        parts = []
        if self.head_dim != self.model_head_dim:
            parts.append(f"head_dim {self.model_head_dim} -> {self.head_dim} "
                         f"(the kernel needs a multiple of {LANES})")
        if self.num_kv_heads != self.model_kv_heads:
            parts.append(f"KV heads {self.model_kv_heads} -> {self.num_kv_heads} "
                         "(2 x KV heads must tile: 1, 2, 4, 8 or a multiple of 8 KV heads)")
        return (f"padded for the Pallas kernel: {'; '.join(parts)}; the KV cache takes "
                f"{self.memory_factor:.2f}x the memory")


def kernel_fit(num_kv_heads: int, head_dim: int,
               cache_dtype: torch.dtype = torch.float32) -> KernelFit:
    kv = num_kv_heads
    while not _tiles(kv):
        kv += 1
    return KernelFit(kv, -(-head_dim // LANES) * LANES, num_kv_heads, head_dim, cache_dtype)


def ragged_attention(kernel: RaggedKernel, fit: KernelFit, query: torch.Tensor,
                     kv_cache: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                     query_start_loc: torch.Tensor, *, scale: float,
                     sliding_window: int | None = None,
                     soft_cap: float | None = None) -> torch.Tensor:
    """Run ``kernel`` for ``query`` ``[T, H, d]`` (the model's shapes) on a
    cache of ``fit``'s shapes; returns ``[T, H, d]``. Sequences past the real
    ones (``seq_lens`` 0, the runner's padding) are not counted in ``num_seqs``."""
    tokens, heads, dim = query.shape
    group = heads // fit.model_kv_heads
    q = query.view(tokens, fit.model_kv_heads, group, dim)
    if fit.padded:
        q = torch.nn.functional.pad(
            q, (0, fit.head_dim - dim, 0, 0, 0, fit.num_kv_heads - fit.model_kv_heads))
    q = q.reshape(tokens, fit.num_kv_heads * group, fit.head_dim)
    num_seqs = (seq_lens > 0).sum().to(torch.int32).reshape(1)
    out = kernel(q, kv_cache, seq_lens.to(torch.int32), block_tables.to(torch.int32),
                 query_start_loc.to(torch.int32), num_seqs, sm_scale=scale,
                 sliding_window=sliding_window, soft_cap=soft_cap)
    out = out.view(tokens, fit.num_kv_heads, group, fit.head_dim)
    return out[:, : fit.model_kv_heads, :, :dim].reshape(tokens, heads, dim)


def torch_xla_kernel() -> RaggedKernel:
    """The kernel as torch-xla ships it (on a TPU; imports torch_xla and jax)."""
    from torch_xla.experimental.custom_kernel import ragged_paged_attention

    def kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, **kwargs):
        return ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                      use_kernel=True, **kwargs)

    return kernel
