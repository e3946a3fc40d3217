"""The shipped conformance checks, run against the fake accelerator (a
platform written only against the public contract), and proof that each
check fails on a backend, allocator or communicator that breaks its
contract (a check that cannot fail proves nothing)."""

from __future__ import annotations

import dataclasses

import fakeaccel_inprocess
import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from pllm.core.config import CacheConfig
from pllm.core.interfaces import Platform
from pllm.platforms.common.communicator import TorchDistributedCommunicator
from pllm.testing import conformance as cf
from pllm.testing.metadata import build_metadata, context_slot_mapping

FakeAccel = fakeaccel_inprocess.platform_cls()
from pllm_fakeaccel.allocator import FakeAccelAllocator
from pllm_fakeaccel.attention import FakeAccelAttentionBackend

# ---- the fake platform passes ------------------------------------------------------


def test_fake_detection_and_basics() -> None:
    assert cf.check_detection(FakeAccel).available
    cf.check_platform_basics(FakeAccel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fake_attention_write_and_copy(dtype: torch.dtype) -> None:
    backend = FakeAccelAttentionBackend()
    skipped = cf.check_attention_backend(backend, dtype=dtype,
                                         capabilities=FakeAccel().capabilities)
    # The soft-capped cases are skipped (the plugin does not declare
    # supports_soft_cap); only the large-logit case is fp32-only.
    soft_capped = ["soft_cap_mixed_gqa", "soft_cap_sliding_window_mqa"]
    assert [s.split(":")[0] for s in skipped] == (soft_capped if dtype == torch.float32
                                                  else ["large_logits_gqa", *soft_capped])
    cf.check_write_kv(backend, dtype=dtype)
    cf.check_copy_blocks(backend, dtype=dtype)


def test_fake_allocator() -> None:
    cf.check_kv_cache_allocator(FakeAccel().make_kv_cache_allocator())


def test_fake_collectives_across_two_processes() -> None:
    assert cf.collectives_plan(FakeAccel())[0] == "fork"  # ranks share the host
    cf.check_communicator(FakeAccel, world_size=2, init_method=cf.free_tcp_init_method())


def test_fake_communicator_close_then_rebuild() -> None:
    cf.check_communicator_rebuild(FakeAccel())


def test_pytest_plugin_fixture_selects_like_device_auto(pllm_platform: Platform) -> None:
    from pllm.plugins.manager import get_platform

    assert type(pllm_platform) is type(get_platform())


# ---- the metadata builder -----------------------------------------------------------


def test_build_metadata_layout() -> None:
    md = build_metadata(
        [(5, 1), (0, 3), (4, 6)],
        block_size=4,
        num_blocks=12,
        generator=torch.Generator().manual_seed(1),
    )
    assert (md.num_seqs, md.num_tokens, md.num_decodes) == (3, 10, 1)
    assert md.query_start_loc_cpu == [0, 1, 4, 10] and md.seq_lens_cpu == [6, 3, 10]
    assert (md.max_query_len, md.max_seq_len) == (6, 10)
    assert md.block_tables.shape == (3, 3 + 1)  # widest sequence + one spare column
    used = [int(b) for s, n in enumerate([2, 1, 3]) for b in md.block_tables[s, :n]]
    assert len(set(used)) == len(used) == 6  # no block shared
    assert used != sorted(used)  # shuffled
    table = md.block_tables
    expected = (
        [int(table[0, 1]) * 4 + 1]
        + [int(table[1, 0]) * 4 + i for i in range(3)]
        + [int(table[2, p // 4]) * 4 + p % 4 for p in range(4, 10)]
    )
    assert md.slot_mapping.tolist() == expected
    context = context_slot_mapping(md).tolist()
    assert context == [int(table[0, p // 4]) * 4 + p % 4 for p in range(5)] + [
        int(table[2, 0]) * 4 + p for p in range(4)
    ]


def test_build_metadata_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="query_len >= 1"):
        build_metadata([(3, 0)], block_size=4)
    with pytest.raises(ValueError, match="num_blocks=1 < 2"):
        build_metadata([(5, 1)], block_size=4, num_blocks=1)
    with pytest.raises(ValueError, match="must have query_len 1"):
        build_metadata([(5, 2)], block_size=4, num_decodes=1)


def test_case_from_lengths() -> None:
    case = cf.AttentionCase.from_lengths("c", decode_lens=(1, 17), prefills=((3, 10),))
    assert case.seqs == ((0, 1), (16, 1), (7, 3)) and case.num_decodes == 2
    with pytest.raises(ValueError, match="query_len <= seq_len"):
        cf.AttentionCase.from_lengths("c", prefills=((5, 4),))


# ---- each check catches the contract break it is about ----------------------------------


class NoWindowBackend(FakeAccelAttentionBackend):
    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None, **kw):
        return super().forward(query, kv_cache, metadata, scale=scale, **kw)


class ReadsWholeBlocksBackend(FakeAccelAttentionBackend):
    """Takes every sequence to end at its last block's end: reads stale slots."""

    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None, **kw):
        bs = metadata.block_size
        padded = [-(-n // bs) * bs for n in metadata.seq_lens_cpu]
        metadata = dataclasses.replace(
            metadata, seq_lens_cpu=padded, seq_lens=torch.tensor(padded, dtype=torch.int32)
        )
        return super().forward(query, kv_cache, metadata, scale=scale,
                               sliding_window=sliding_window, **kw)


class WrapsPaddingBackend(FakeAccelAttentionBackend):
    """Writes padding tokens to slot -1, i.e. the cache's last slot."""

    def write_kv(self, key, value, kv_cache, slot_mapping, **kw):
        bs = kv_cache.shape[3]
        slots = slot_mapping.long() % (kv_cache.shape[0] * bs)  # -1 wraps to the last slot
        kv_cache[slots // bs, 0, :, slots % bs] = key.to(kv_cache.dtype)
        kv_cache[slots // bs, 1, :, slots % bs] = value.to(kv_cache.dtype)


class FirstPairOnlyBackend(FakeAccelAttentionBackend):
    def copy_blocks(self, kv_caches, src_to_dst):
        super().copy_blocks(kv_caches, src_to_dst[:1])


def test_attention_check_catches_an_ignored_sliding_window() -> None:
    with pytest.raises(AssertionError, match="mixed_sliding_window_gqa"):
        cf.check_attention_backend(NoWindowBackend())


def test_attention_check_catches_reads_past_the_sequence_end() -> None:
    with pytest.raises(AssertionError, match="ReadsWholeBlocksBackend on case"):
        cf.check_attention_case(ReadsWholeBlocksBackend(), cf.DEFAULT_CASES[0])


def test_attention_check_skips_what_capabilities_rule_out() -> None:
    caps = FakeAccel().capabilities
    narrow = dataclasses.replace(caps, block_sizes=(16,), head_dims=(64,),
                                 supports_sliding_window=False)
    skipped = cf.check_attention_backend(FakeAccelAttentionBackend(), capabilities=narrow)
    assert sorted(s.split(":")[0] for s in skipped) == [
        "block_size_32_gqa",
        "decode_sliding_window_mqa",
        "mixed_sliding_window_gqa",
        "soft_cap_mixed_gqa",  # no supports_soft_cap
        "soft_cap_sliding_window_mqa",
    ]


def test_write_kv_check_catches_written_padding() -> None:
    with pytest.raises(AssertionError, match="all-padding write changed a block"):
        cf.check_write_kv(WrapsPaddingBackend())


def test_copy_blocks_check_catches_a_skipped_pair() -> None:
    with pytest.raises(AssertionError, match="copy_blocks .* layer 0 differs"):
        cf.check_copy_blocks(FirstPairOnlyBackend())


def test_allocator_check_catches_a_budget_overrun() -> None:
    class IgnoresBudget(FakeAccelAllocator):
        def num_blocks(self, cache_config: CacheConfig, bytes_per_block: int) -> int:
            return 1000

    with pytest.raises(AssertionError, match="kv_cache_memory"):
        cf.check_kv_cache_allocator(IgnoresBudget())


def test_allocator_check_no_longer_asks_for_the_override() -> None:
    """num_blocks_override is applied by the core: an allocator that never
    looks at it conforms."""

    class NoOverride(FakeAccelAllocator):
        def num_blocks(self, cache_config: CacheConfig, bytes_per_block: int) -> int:
            return super().num_blocks(dataclasses.replace(cache_config, num_blocks_override=None),
                                      bytes_per_block)

    cf.check_kv_cache_allocator(NoOverride())


class BadGatherCommunicator(TorchDistributedCommunicator):
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat([tensor] * self.world_size, dim=dim)  # own data only


class BadGatherPlatform(FakeAccel):
    name = "badgather"

    def make_communicator(self, rank: int, world_size: int, init_method: str):
        return BadGatherCommunicator(rank, world_size, init_method)


def test_collectives_check_catches_a_wrong_all_gather() -> None:
    with pytest.raises(ProcessRaisedException, match="all_gather"):
        cf.check_communicator(BadGatherPlatform, world_size=2)


class NoSubgroupCommunicator(TorchDistributedCommunicator):
    def new_group(self, ranks):
        super().new_group(ranks)  # every rank takes part, as the contract says ...
        return self  # ... but the "group" is still every rank


class NoSubgroupPlatform(FakeAccel):
    """Declares pipeline parallelism, with subgroups that are not."""

    name = "nosubgroup"

    @property
    def capabilities(self):
        return dataclasses.replace(super().capabilities, pipeline_parallel=True)

    def make_communicator(self, rank: int, world_size: int, init_method: str):
        return NoSubgroupCommunicator(rank, world_size, init_method)


class PipelineFakePlatform(FakeAccel):
    name = "pipelinefake"

    @property
    def capabilities(self):
        return dataclasses.replace(super().capabilities, pipeline_parallel=True)


def test_collectives_check_passes_torch_subgroups_and_catches_fake_ones() -> None:
    cf.check_communicator(PipelineFakePlatform, world_size=2)  # torch.distributed's own
    with pytest.raises(ProcessRaisedException, match=r"new_group\(\[\d\]\)"):
        cf.check_communicator(NoSubgroupPlatform, world_size=2)


def test_collectives_plan_needs_a_device_per_rank_unless_shared() -> None:
    caps = FakeAccel().capabilities

    class OwnDevices(FakeAccel):
        name = "owndevices"

        @property
        def capabilities(self):
            return dataclasses.replace(caps, ranks_share_device=False)

    start, why = cf.collectives_plan(OwnDevices(), world_size=2)
    assert start is None and "2 ranks need 2 devices" in why and "1 visible" in why


# ---- 8-bit KV caches ----------------------------------------------------------

FP8_KV = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_dtype", FP8_KV, ids=str)
def test_fake_fp8_kv_cache(kv_dtype: torch.dtype, dtype: torch.dtype) -> None:
    backend = FakeAccelAttentionBackend()
    caps = FakeAccel().capabilities
    assert caps.supports_kv_cache_dtype(kv_dtype)
    # The fake quantizes with torch itself: no element may be a step off.
    assert cf.check_write_kv_fp8(backend, kv_dtype, dtype=dtype) == 0
    cf.check_copy_blocks(backend, dtype=dtype, kv_cache_dtype=kv_dtype)
    skipped = cf.check_attention_backend(backend, dtype=dtype, capabilities=caps,
                                         kv_cache_dtype=kv_dtype)
    assert [s.split(":")[0] for s in skipped] == ["large_logits_gqa", "soft_cap_mixed_gqa",
                                                  "soft_cap_sliding_window_mqa"]


class _IgnoresKScale(FakeAccelAttentionBackend):
    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None,
                k_scale=1.0, v_scale=1.0):
        return super().forward(query, kv_cache, metadata, scale=scale,
                               sliding_window=sliding_window, v_scale=v_scale)


class _IgnoresVScale(FakeAccelAttentionBackend):
    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None,
                k_scale=1.0, v_scale=1.0):
        return super().forward(query, kv_cache, metadata, scale=scale,
                               sliding_window=sliding_window, k_scale=k_scale)


class _CastsWithoutSaturating(FakeAccelAttentionBackend):
    def write_kv(self, key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
        bs = kv_cache.shape[3]
        target = kv_cache.view(torch.uint8)
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        for i, x, s in ((0, key, k_scale), (1, value, v_scale)):
            q = (x[keep].float() / s).to(kv_cache.dtype).view(torch.uint8)
            target[slots // bs, i, :, slots % bs] = q


@pytest.mark.parametrize("mutant", [_IgnoresKScale, _IgnoresVScale])
def test_fp8_attention_check_catches_an_ignored_scale(mutant) -> None:
    with pytest.raises(AssertionError, match="fp8|float8"):
        cf.check_attention_backend(mutant(), cases=cf.QUICK_CASES,
                                   kv_cache_dtype=torch.float8_e4m3fn)


def test_fp8_write_check_catches_a_cast_without_saturation() -> None:
    # e5m2 overflows to inf under a plain cast (e4m3fn has no inf: torch clips it).
    with pytest.raises(AssertionError, match="not saturated"):
        cf.check_write_kv_fp8(_CastsWithoutSaturating(), torch.float8_e5m2)
