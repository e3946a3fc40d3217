"""Decode steps on persistent, padded buffers: what graph capture needs.

A captured graph replays the kernels it recorded on the memory it recorded
them with. So a decode-only step runs on inputs copied into buffers that live
as long as the engine, padded up to one of a few batch sizes (buckets), with
each bucket's attention metadata built once::

    5 decodes -> bucket 8: rows 0-4 get the step's ids, positions, slots,
    context lengths and block tables; rows 5-7 are padding (slot -1 writes
    nothing, context length 0 attends to nothing); bucket 8's graph replays;
    rows 0-4 of its output are the step's hidden states.

The host-side lengths in a bucket's metadata are the worst case
(``max_model_len``), so a backend sizes its launch (split-KV partitions, for
one) for any context; the kernels read the real lengths from ``seq_lens``.

The platform decides what capturing means by overriding ``capture`` (and
returns its subclass from ``Platform.make_decode_runner``). The base class
replays the forward eagerly on the same buffers, which is how padding and
bucketing are tested on hosts without an accelerator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata, ForwardContext

logger = logging.getLogger(__name__)


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to (and including) ``max_num_seqs``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += range(16, max_num_seqs, 16)
    return sorted(set(sizes) | {max_num_seqs})


class StaticDecodeRunner:
    def __init__(self, model, backend: AttentionBackend, kv_caches: list[torch.Tensor], *,
                 block_size: int, max_model_len: int, batch_sizes: list[int],
                 device: torch.device) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.block_size, self.max_model_len = block_size, max_model_len
        self.batch_sizes = sorted(set(batch_sizes))
        rows = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(rows, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        self.num_replays = 0  # steps served, for tests and stats

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def accepts(self, metadata: AttentionMetadata) -> bool:
        """Whether ``run`` can serve this step: decodes only, few enough, and
        block tables that fit the persistent one."""
        return (metadata.num_decodes == metadata.num_seqs <= self.max_batch_size
                and metadata.block_tables.shape[1] <= self.block_tables.shape[1])

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest batch size holding ``num_seqs`` decodes, or None."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def metadata(self, rows: int) -> AttentionMetadata:
        md = AttentionMetadata(
            num_seqs=rows, num_tokens=rows, num_decodes=rows, max_query_len=1,
            max_seq_len=self.max_model_len, block_size=self.block_size,
            query_start_loc=self.query_start_loc[: rows + 1], seq_lens=self.seq_lens[:rows],
            block_tables=self.block_tables[:rows], slot_mapping=self.slot_mapping[:rows],
            query_start_loc_cpu=list(range(rows + 1)), seq_lens_cpu=[self.max_model_len] * rows,
        )
        return self.backend.prepare_metadata(md)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Record every bucket, largest first (so the smaller ones can reuse
        its memory), with the buffers all padding."""
        self._pad(0, self.max_batch_size)
        t0 = time.perf_counter()
        for rows in reversed(self.batch_sizes):
            ctx = ForwardContext(self.backend, self.metadata(rows), self.kv_caches)
            ids, pos = self.input_ids[:rows], self.positions[:rows]
            self._replays[rows] = self.capture(lambda ids=ids, pos=pos, ctx=ctx: self.model(ids, pos, ctx))
        logger.info("decode step captured for batch sizes %s in %.1fs",
                    ",".join(map(str, self.batch_sizes)), time.perf_counter() - t0)

    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record ``forward`` (which reads only the persistent buffers) and
        return what replays it; the base class just calls it again."""
        return forward

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states ``[n, hidden]`` of a decode-only step of ``n`` sequences
        (``n <= max_batch_size``), computed on the persistent buffers."""
        if not self.accepts(metadata):
            raise ValueError(f"not a decode-only step of at most {self.max_batch_size} sequences "
                             f"within {self.max_model_len} tokens")
        n = metadata.num_seqs
        rows = self.bucket(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(metadata.seq_lens, non_blocking=True)
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, width:].zero_()
        self.block_tables[:n, :width].copy_(metadata.block_tables, non_blocking=True)
        self._pad(n, rows)
        self.num_replays += 1
        return self._replays[rows]()[:n]

    def _pad(self, lo: int, hi: int) -> None:
        if hi > lo:
            self.input_ids[lo:hi].zero_()
            self.positions[lo:hi].zero_()
            self.slot_mapping[lo:hi].fill_(-1)
            self.seq_lens[lo:hi].zero_()
            self.block_tables[lo:hi].zero_()
