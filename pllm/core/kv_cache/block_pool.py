"""The logical block pool: reference counts, a free list and the prefix cache.

The core only ever holds block *ids*; the platform owns the memory.

A block is in exactly one of three states::

    in use      ref_count > 0                      (maybe cached: has a hash)
    free+cached ref_count == 0, in free list, hash  (a prefix hit revives it)
    free        ref_count == 0, in free list        (reused first)

The free list is ordered for eviction: plain free blocks at the front,
cached ones behind them in least-recently-freed order, so allocation takes
uncached blocks first and then evicts the least recently used cached block.
"""

from __future__ import annotations

from collections import OrderedDict

NO_HASH = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [NO_HASH] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_queries = 0  # prefix-cache lookups, in tokens
        self.num_hits = 0

    # ---- queries ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (evicting cached ones if need be)."""
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def record_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queries += num_tokens
        self.num_hits += num_hit_tokens

    # ---- allocation ------------------------------------------------------
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self.free)} free")
        blocks = []
        for _ in range(num_blocks):
            block, _ = self.free.popitem(last=False)
            self._evict(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[int]) -> None:
        """Take one more reference to each block (a prefix hit or a fork)."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free.
        Pass blocks in sequence order: the tail is evicted first."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} released twice"
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.block_hash[block] is NO_HASH:
                    self.free.move_to_end(block, last=False)

    # ---- prefix cache ----------------------------------------------------
    def cache_block(self, block: int, block_hash: int) -> None:
        """Register a full, computed block under ``block_hash``. If another block
        already holds the same content, the first one stays the cached copy."""
        if not self.enable_caching or self.block_hash[block] is not NO_HASH:
            return
        if block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def _evict(self, block: int) -> None:
        block_hash = self.block_hash[block]
        if block_hash is not NO_HASH:
            del self.cached[block_hash]
            self.block_hash[block] = NO_HASH
