"""Per-sequence block tables on top of the block pool.

``allocate_slots`` is the one place blocks are taken::

    |<- num_computed ->|<- num_new ->|
    [ blk 0 ][ blk 1 ][ blk 2 ][ blk 3 ]      block_ids of the sequence
    ^ prefix-cache hits (shared, full)  ^ new blocks as needed

If the block about to be written is shared with another sequence (a fork
after prefill), it is copied first (copy-on-write): the caller gets the
``(src, dst)`` pairs to copy before the forward pass.
"""

from __future__ import annotations

from pllm.core.kv_cache.block_pool import BlockPool
from pllm.core.request import Sequence


def hash_block(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    """A block's identity: its tokens and everything before them."""
    return hash((parent_hash, tokens))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.pending_copies: list[tuple[int, int]] = []

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ----------------------------------------------------
    def _update_hashes(self, seq: Sequence) -> None:
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks that cover the longest prefix of a fresh sequence.
        At least one token is always left to compute (its logits are needed)."""
        if not self.enable_prefix_caching or seq.request.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        self._update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    # ---- allocation ------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        return self.pool.can_allocate(self._blocks_needed(seq, num_new_tokens, cached))

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, cached: list[int]) -> int:
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        total = self.num_blocks_for(num_computed + num_new_tokens)
        have = len(seq.block_ids) + len(cached)
        # Cached blocks sitting in the free list are taken from it, too.
        revived = sum(1 for b in cached if self.pool.ref_counts[b] == 0)
        return max(total - have, 0) + self._cow_needed(seq, num_computed) + revived

    def _cow_needed(self, seq: Sequence, num_computed: int) -> int:
        """1 if the next token lands in a partial block shared with another sequence."""
        idx = num_computed // self.block_size
        if num_computed % self.block_size == 0 or idx >= len(seq.block_ids):
            return 0
        return int(self.pool.ref_counts[seq.block_ids[idx]] > 1)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens after the
        ``cached`` prefix-cache hits (which the caller then counts as computed:
        the scheduler owns ``num_computed_tokens``). Returns False (and changes
        nothing) if the pool cannot supply the blocks."""
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        num_computed = seq.num_computed_tokens + len(cached) * self.block_size
        if cached:
            self.pool.touch(list(cached))
            seq.block_ids.extend(cached)
            seq.num_cached_blocks = len(cached)
        if self._cow_needed(seq, num_computed):
            idx = num_computed // self.block_size
            old = seq.block_ids[idx]
            (new,) = self.pool.allocate(1)
            self.pending_copies.append((old, new))
            self.pool.release([old])
            seq.block_ids[idx] = new
        total = self.num_blocks_for(num_computed + num_new_tokens)
        if total > len(seq.block_ids):
            seq.block_ids.extend(self.pool.allocate(total - len(seq.block_ids)))
        return True

    def share_blocks(self, child: Sequence, parent: Sequence) -> None:
        """``child`` (a fork of ``parent``) now shares its blocks and their hashes."""
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_blocks = parent.num_cached_blocks
        self.pool.touch(child.block_ids)

    def cache_computed_blocks(self, seq: Sequence, num_computed: int | None = None) -> None:
        """Register the sequence's full blocks whose K/V are all computed
        (in its first ``num_computed`` tokens; None: ``num_computed_tokens``)."""
        if not self.enable_prefix_caching:
            return
        self._update_hashes(seq)
        if num_computed is None:
            num_computed = seq.num_computed_tokens
        num_full = min(num_computed // self.block_size, len(seq.block_hashes))
        for i in range(seq.num_cached_blocks, num_full):
            self.pool.cache_block(seq.block_ids[i], seq.block_hashes[i])
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def trim(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Give back the blocks past the sequence's first ``num_tokens``
        (None: its computed tokens): a speculative step's lookahead that held
        only rejected drafts, or drafts dropped before the step."""
        keep = self.num_blocks_for(seq.num_computed_tokens if num_tokens is None else num_tokens)
        if len(seq.block_ids) > keep:
            self.pool.release(seq.block_ids[keep:])
            del seq.block_ids[keep:]

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_cached_blocks = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
