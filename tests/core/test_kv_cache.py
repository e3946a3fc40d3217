"""Block pool and KV-cache manager: reference counts, copy-on-write, prefix
hits, LRU eviction, and no leaks."""

from __future__ import annotations

import pytest

from pllm.core.kv_cache.block_pool import BlockPool
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.request import Request, Sequence
from pllm.core.sampling_params import SamplingParams

BS = 4


def make_seq(tokens: list[int], **params) -> Sequence:
    req = Request("r", None, list(tokens), SamplingParams(**params), frozenset({2}))
    seq = Sequence(req, 0, list(tokens), len(tokens))
    req.seqs.append(seq)
    return seq


def compute(kv: KVCacheManager, seq: Sequence, cached=()) -> None:
    """What the scheduler and engine do for a sequence's whole prefill."""
    num_new = seq.num_tokens - seq.num_computed_tokens - len(cached) * BS
    assert kv.allocate_slots(seq, num_new, list(cached))
    seq.num_computed_tokens += num_new
    kv.cache_computed_blocks(seq)


def test_ref_counts_and_release_order():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert [pool.ref_counts[b] for b in a] == [1, 1]
    pool.touch(a)
    assert [pool.ref_counts[b] for b in a] == [2, 2]
    pool.release(a)
    assert pool.num_free_blocks == 2
    pool.release(a)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_allocate_slots_grows_by_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10, 20)))  # 10 tokens -> 3 blocks
    compute(kv, seq)
    assert len(seq.block_ids) == 3
    seq.token_ids += [1, 1, 1]  # 13 tokens -> 4 blocks once computed
    assert kv.allocate_slots(seq, 3)
    assert len(seq.block_ids) == 4
    kv.free(seq)
    assert kv.pool.num_free_blocks == 8


def test_allocate_fails_without_changing_anything():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(10, 22)))  # needs 3 blocks
    assert not kv.allocate_slots(seq, 12)
    assert seq.block_ids == [] and kv.pool.num_free_blocks == 2


def test_prefix_hit_shares_full_blocks_and_counts():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    first = make_seq(prompt)
    compute(kv, first)
    second = make_seq(prompt + [7, 7])
    hits = kv.find_cached_prefix(second)
    assert hits == first.block_ids[:2]
    compute(kv, second, hits)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert all(kv.pool.ref_counts[b] == 2 for b in hits)
    # A different first block means no hit at all (the hash chains parents).
    other = make_seq([1] + prompt[1:])
    assert kv.find_cached_prefix(other) == []


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(100, 108))  # exactly 2 blocks
    compute(kv, make_seq(prompt))
    again = make_seq(prompt)
    assert len(kv.find_cached_prefix(again)) == 1  # not 2: the last token's logits are needed


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(100, 105)))  # 1 full block + 1 token
    compute(kv, a)
    kv.free(a)
    assert kv.pool.num_free_blocks == 4
    b = make_seq(list(range(100, 105)))
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 1  # survived the free: cached and unreferenced
    cached_block = hits[0]
    # Filling the pool with unrelated sequences evicts it (it is the LRU cached block).
    c = make_seq(list(range(200, 216)))  # 4 blocks: the whole pool
    compute(kv, c)
    assert kv.pool.lookup(b.block_hashes[0]) is None
    assert cached_block in c.block_ids
    kv.free(c)


def test_lru_evicts_least_recently_freed_first():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    old = make_seq([1, 2, 3, 4, 9])
    new = make_seq([5, 6, 7, 8, 9])
    compute(kv, old)
    compute(kv, new)
    kv.free(old)
    kv.free(new)
    # 3 blocks: the 2 uncached tail blocks first, then the least recently freed cached one.
    filler = make_seq(list(range(11, 23)))
    compute(kv, filler)
    assert kv.pool.lookup(old.block_hashes[0]) is None
    assert kv.pool.lookup(new.block_hashes[0]) is not None


def test_copy_on_write_after_fork():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    parent = make_seq([1, 2, 3, 4, 5, 6])  # block 0 full, block 1 half full
    compute(kv, parent)
    child = parent.fork(1)
    kv.share_blocks(child, parent)
    shared_tail = parent.block_ids[1]
    assert kv.pool.ref_counts[shared_tail] == 2
    for seq in (parent, child):
        seq.token_ids.append(9)
    assert kv.allocate_slots(parent, 1)  # shared partial block: copy it first
    copies = kv.take_pending_copies()
    assert copies == [(shared_tail, parent.block_ids[1])]
    assert parent.block_ids[1] != shared_tail and parent.block_ids[0] == child.block_ids[0]
    assert kv.allocate_slots(child, 1)  # now the only owner: writes in place
    assert kv.take_pending_copies() == [] and child.block_ids[1] == shared_tail
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free_blocks == 8


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(100, 110)))
    compute(kv, a)
    assert kv.find_cached_prefix(make_seq(list(range(100, 110)))) == []


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    compute(kv, make_seq(list(range(100, 110))))
    assert kv.find_cached_prefix(make_seq(list(range(100, 110)), prompt_logprobs=1)) == []
