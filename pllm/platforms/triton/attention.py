"""PagedAttention in Triton for NVIDIA GPUs; the ROCm platform reuses it.

Same cache layout as the reference attention (``pllm.testing.reference``)::

    kv_cache[0 = K | 1 = V, block, offset_in_block, kv_head, head_dim]

One step's flat batch is served by two launches (three with split-KV):

    rows [0, num_decodes)            -> decode kernel, split-KV over the context
    rows [num_decodes, num_tokens)   -> varlen prefill kernel (chunks + context)

Nothing here reads a device tensor back to the host: grids come from the
metadata's host fields, so a step never syncs on attention.
"""

from __future__ import annotations

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata
from pllm.core.kv_cache.fp8 import is_fp8
from pllm.platforms.triton.kernels.cache import copy_blocks as copy_cache_blocks
from pllm.platforms.triton.kernels.cache import reshape_and_cache
from pllm.platforms.triton.kernels.common import check_inputs
from pllm.platforms.triton.kernels.decode import choose_num_splits, decode_attention
from pllm.platforms.triton.kernels.prefill import prefill_attention

_MAX_DECODE_LEN = "triton.max_decode_len"  # metadata.extras key set by prepare_metadata


class TritonAttentionBackend(AttentionBackend):
    """Triton PagedAttention: fp32/fp16/bf16, GQA/MQA, any block size, any
    head_dim (padded to a power of two inside the kernels), sliding window;
    the cache in the model dtype or an 8-bit float (K/V converted to the
    query dtype as they load, k_scale folded into the softmax scale and
    v_scale into the output).

    ``min_partition`` (keys per split-KV partition, at least), ``max_splits``
    and ``num_sms`` (multiprocessors to fill; read from the device when None)
    tune how decodes of long contexts are spread over programs.
    """

    name = "triton"

    def __init__(self, *, min_partition: int = 256, max_splits: int = 64,
                 num_sms: int | None = None) -> None:
        if min_partition < 1 or max_splits < 1:
            raise ValueError(
                f"min_partition ({min_partition}) and max_splits ({max_splits}) must be >= 1"
            )
        self.min_partition = min_partition
        self.max_splits = max_splits
        self._num_sms = num_sms

    # ---- cache -------------------------------------------------------------

    def kv_cache_shape(self, num_blocks, block_size, num_kv_heads, head_dim):
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def write_kv(self, key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
        if not is_fp8(kv_cache.dtype):
            k_scale = v_scale = 1.0
        reshape_and_cache(key, value, kv_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)

    def copy_blocks(self, kv_caches, src_to_dst):
        copy_cache_blocks(kv_caches, src_to_dst)

    # ---- attention ---------------------------------------------------------

    def prepare_metadata(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """Records the longest decode context (host int) so every layer picks
        the same split count without scanning ``seq_lens_cpu`` again."""
        metadata.extras[_MAX_DECODE_LEN] = self._max_decode_len(metadata)
        return metadata

    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None, k_scale=1.0,
                v_scale=1.0, soft_cap=None):
        check_inputs(query, kv_cache)
        if not is_fp8(kv_cache.dtype):
            k_scale = v_scale = 1.0
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
        window = sliding_window or 0
        out = torch.empty_like(query)
        nd = metadata.num_decodes
        if nd:
            num_splits = self.num_decode_splits(
                metadata, kv_cache.shape[3], query.device, sliding_window=window or None
            )
            decode_attention(
                query, kv_cache, out, metadata.seq_lens, metadata.block_tables,
                num_seqs=nd, scale=scale, num_splits=num_splits, sliding_window=window,
                k_scale=k_scale, v_scale=v_scale, soft_cap=soft_cap,
            )
        if metadata.num_prefills:
            starts = metadata.query_start_loc_cpu
            first = starts[nd] if starts else nd  # decodes are one token each
            prefill_attention(
                query, kv_cache, out, metadata.query_start_loc, metadata.seq_lens,
                metadata.block_tables, first_seq=nd, num_seqs=metadata.num_prefills,
                first_token=first,
                num_query_tokens=metadata.num_tokens - first, scale=scale,
                sliding_window=window, k_scale=k_scale, v_scale=v_scale, soft_cap=soft_cap,
            )
        return out

    def num_decode_splits(self, metadata: AttentionMetadata, num_kv_heads: int,
                          device: torch.device, *, sliding_window: int | None = None) -> int:
        """How many split-KV partitions ``forward`` uses for this step's
        decodes (1 = no split, no reduce kernel). Exposed for tests and tuning."""
        max_len = metadata.extras.get(_MAX_DECODE_LEN)
        if max_len is None:
            max_len = self._max_decode_len(metadata)
        if sliding_window:
            max_len = min(max_len, sliding_window)
        return choose_num_splits(
            max_len, max(metadata.num_decodes, 1) * num_kv_heads, num_sms=self._sms(device),
            min_partition=self.min_partition, max_splits=self.max_splits,
        )

    # ---- helpers -----------------------------------------------------------

    @staticmethod
    def _max_decode_len(metadata: AttentionMetadata) -> int:
        nd = metadata.num_decodes
        if nd and metadata.seq_lens_cpu:
            return max(metadata.seq_lens_cpu[:nd])
        return metadata.max_seq_len

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            if device.type == "cuda":  # ROCm builds of torch report CUs here too
                self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            else:  # TRITON_INTERPRET=1 on CPU tensors: any fixed figure will do
                self._num_sms = 128
        return self._num_sms
