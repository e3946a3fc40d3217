"""Build :class:`AttentionMetadata` for tests from ``(cached_len, query_len)``
per sequence, with random, non-contiguous block tables.

Example, ``block_size = 4``, ``seqs = [(5, 1), (0, 3)]``::

    seq 0: decode, positions 0..5, new token at 5 -> table e.g. [9, 2]
    seq 1: prefill, positions 0..2            -> table e.g. [6, 0]  (0 = padding)
    slot_mapping = [2*4 + 1, 6*4 + 0, 6*4 + 1, 6*4 + 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pllm.core.interfaces import AttentionMetadata


def num_blocks_needed(seqs: Sequence[tuple[int, int]], block_size: int) -> int:
    """Blocks the sequences occupy together (no sharing)."""
    return sum(-(-(cached + new) // block_size) for cached, new in seqs)


def build_metadata(
    seqs: Sequence[tuple[int, int]],
    block_size: int,
    num_blocks: int | None = None,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    num_decodes: int | None = None,
    extra_table_columns: int = 1,
) -> AttentionMetadata:
    """Metadata for one step over ``seqs`` (each ``(cached_len, query_len)``).

    Block ids are a random permutation of ``range(num_blocks)`` (default: twice
    the blocks needed), so tables are shuffled and non-contiguous; unused
    table columns hold block 0, plus ``extra_table_columns`` spare columns so
    kernels cannot assume an exact table width. ``num_decodes`` defaults to
    the number of leading sequences with one query token and cached context.
    """
    if not seqs:
        raise ValueError("seqs must name at least one (cached_len, query_len)")
    for cached, new in seqs:
        if cached < 0 or new < 1:
            raise ValueError(f"need cached_len >= 0 and query_len >= 1, got {(cached, new)}")
    needed = num_blocks_needed(seqs, block_size)
    num_blocks = 2 * needed if num_blocks is None else num_blocks
    if num_blocks < needed:
        raise ValueError(f"num_blocks={num_blocks} < {needed} blocks the sequences need")
    if num_decodes is None:
        num_decodes = 0
        while num_decodes < len(seqs) and seqs[num_decodes][1] == 1 and seqs[num_decodes][0] > 0:
            num_decodes += 1
    if any(new != 1 for _, new in seqs[:num_decodes]):
        raise ValueError(f"the first num_decodes={num_decodes} sequences must have query_len 1")

    order = torch.randperm(num_blocks, generator=generator).tolist()
    seq_lens = [cached + new for cached, new in seqs]
    width = max(-(-n // block_size) for n in seq_lens) + extra_table_columns
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    slots: list[int] = []
    for s, (cached, new) in enumerate(seqs):
        count = -(-seq_lens[s] // block_size)
        ids, order = order[:count], order[count:]
        tables[s, :count] = torch.tensor(ids, dtype=torch.int32)
        for pos in range(cached, cached + new):
            slots.append(ids[pos // block_size] * block_size + pos % block_size)

    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    return AttentionMetadata(
        num_seqs=len(seqs),
        num_tokens=starts[-1],
        num_decodes=num_decodes,
        max_query_len=max(new for _, new in seqs),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )


def context_slot_mapping(
    metadata: AttentionMetadata, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Slots of every sequence's *cached* positions (those written in earlier
    steps), flattened in sequence order: what a test writes before ``forward``."""
    tables = metadata.block_tables.cpu().long()
    bs = metadata.block_size
    parts = [torch.zeros(0, dtype=torch.int64)]
    for s in range(metadata.num_seqs):
        q_len = metadata.query_start_loc_cpu[s + 1] - metadata.query_start_loc_cpu[s]
        pos = torch.arange(metadata.seq_lens_cpu[s] - q_len)  # vectorized: long contexts
        parts.append(tables[s, pos // bs] * bs + pos % bs)
    return torch.cat(parts).to(device)
