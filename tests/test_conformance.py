"""The shipped conformance checks, run against the CPU platform, and proof
that each check fails on a backend, allocator or communicator that breaks
its contract (a check that cannot fail proves nothing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from pllm.core.config import CacheConfig
from pllm.core.interfaces import Platform
from pllm.platforms.cpu.allocator import CPUKVCacheAllocator, KVCacheMemoryError
from pllm.platforms.cpu.attention import CPUAttentionBackend
from pllm.platforms.cpu.communicator import GlooCommunicator
from pllm.platforms.cpu.platform import CPUPlatform
from pllm.plugins.manager import get_platform
from pllm.testing import conformance as cf
from pllm.testing.metadata import build_metadata, context_slot_mapping

# ---- the CPU platform passes --------------------------------------------------


def test_cpu_detection_and_basics() -> None:
    assert cf.check_detection(CPUPlatform).available
    cf.check_platform_basics(CPUPlatform())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_attention_write_and_copy(dtype: torch.dtype) -> None:
    backend = CPUAttentionBackend()
    skipped = cf.check_attention_backend(
        backend, dtype=dtype, capabilities=CPUPlatform().capabilities
    )
    assert skipped == []
    cf.check_write_kv(backend, dtype=dtype)
    cf.check_copy_blocks(backend, dtype=dtype)


def test_cpu_allocator() -> None:
    platform = CPUPlatform()
    cf.check_kv_cache_allocator(
        platform.make_kv_cache_allocator(), memory_info=platform.memory_info()
    )


def test_cpu_collectives_across_two_processes() -> None:
    cf.check_communicator(CPUPlatform, world_size=2, init_method=cf.free_tcp_init_method())


def test_pytest_plugin_fixture_selects_like_device_auto(pllm_platform: Platform) -> None:
    assert type(pllm_platform) is type(get_platform())


# ---- the CPU allocator's sizing ------------------------------------------------------


def test_cpu_allocator_sizes_from_budget_override_and_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    allocator = CPUKVCacheAllocator(memory_fraction=0.5)
    assert allocator.num_blocks(CacheConfig(kv_cache_memory=10_000), 1_000) == 10
    assert allocator.num_blocks(CacheConfig(kv_cache_memory=10_999), 1_000) == 10
    assert allocator.num_blocks(CacheConfig(kv_cache_memory=10, num_blocks_override=3), 1_000) == 3

    class Memory:
        available = 8_000

    monkeypatch.setattr("psutil.virtual_memory", lambda: Memory())
    assert allocator.num_blocks(CacheConfig(), 1_000) == 4  # half of the available RAM
    with pytest.raises(
        KVCacheMemoryError, match=r"kv_cache_memory = 999 bytes holds no .* 1000 bytes"
    ):
        allocator.num_blocks(CacheConfig(kv_cache_memory=999), 1_000)
    with pytest.raises(ValueError, match="memory_fraction"):
        CPUKVCacheAllocator(memory_fraction=1.5)


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


# ---- each check catches the contract break it is about ----------------------------------


class NoWindowBackend(CPUAttentionBackend):
    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None):  # noqa: ANN001, ANN201
        return super().forward(query, kv_cache, metadata, scale=scale)


class ReadsWholeBlocksBackend(CPUAttentionBackend):
    """Takes every sequence to end at its last block's end: reads stale slots."""

    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None):  # noqa: ANN001, ANN201
        bs = metadata.block_size
        padded = [-(-n // bs) * bs for n in metadata.seq_lens_cpu]
        metadata = dataclasses.replace(
            metadata, seq_lens_cpu=padded, seq_lens=torch.tensor(padded, dtype=torch.int32)
        )
        return super().forward(
            query, kv_cache, metadata, scale=scale, sliding_window=sliding_window
        )


class WrapsPaddingBackend(CPUAttentionBackend):
    """Writes padding tokens to slot -1, i.e. the cache's last slot."""

    def write_kv(self, key, value, kv_cache, slot_mapping):  # noqa: ANN001, ANN201
        # The CPU layout: [2, kv_head, block, offset, head_dim].
        flat = kv_cache.view(2, kv_cache.shape[1], -1, kv_cache.shape[-1])
        flat[0][:, slot_mapping] = key.transpose(0, 1).to(kv_cache.dtype)
        flat[1][:, slot_mapping] = value.transpose(0, 1).to(kv_cache.dtype)


class FirstPairOnlyBackend(CPUAttentionBackend):
    def copy_blocks(self, kv_caches, src_to_dst):  # noqa: ANN001, ANN201
        super().copy_blocks(kv_caches, src_to_dst[:1])


def test_attention_check_catches_an_ignored_sliding_window() -> None:
    with pytest.raises(AssertionError, match="mixed_sliding_window_gqa"):
        cf.check_attention_backend(NoWindowBackend())


def test_attention_check_catches_reads_past_the_sequence_end() -> None:
    with pytest.raises(AssertionError, match="ReadsWholeBlocksBackend on case"):
        cf.check_attention_case(ReadsWholeBlocksBackend(), cf.DEFAULT_CASES[0])


def test_attention_check_skips_what_capabilities_rule_out() -> None:
    caps = CPUPlatform().capabilities
    narrow = type(caps)(block_sizes=(16,), head_dims=(64,), supports_sliding_window=False)
    skipped = cf.check_attention_backend(CPUAttentionBackend(), capabilities=narrow)
    assert sorted(s.split(":")[0] for s in skipped) == [
        "block_size_32_gqa",
        "decode_sliding_window_mqa",
        "mixed_sliding_window_gqa",
    ]


def test_write_kv_check_catches_written_padding() -> None:
    with pytest.raises(AssertionError, match="all-padding write changed the cache"):
        cf.check_write_kv(WrapsPaddingBackend())


def test_copy_blocks_check_catches_a_skipped_pair() -> None:
    with pytest.raises(AssertionError, match="copy_blocks .* layer 0 differs"):
        cf.check_copy_blocks(FirstPairOnlyBackend())


def test_allocator_check_catches_an_ignored_override() -> None:
    class IgnoresOverride(CPUKVCacheAllocator):
        def num_blocks(self, cache_config: CacheConfig, bytes_per_block: int) -> int:
            return 1

    with pytest.raises(AssertionError, match="ignored num_blocks_override=7"):
        cf.check_kv_cache_allocator(IgnoresOverride())


class BadGatherCommunicator(GlooCommunicator):
    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return torch.cat([tensor] * self.world_size, dim=dim)  # own data only


class BadGatherPlatform(CPUPlatform):
    name = "badgather"

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> GlooCommunicator:
        return BadGatherCommunicator(rank, world_size, init_method)


def test_collectives_check_catches_a_wrong_all_gather() -> None:
    with pytest.raises(ProcessRaisedException, match="all_gather"):
        cf.check_communicator(BadGatherPlatform, world_size=2)


# ---- 8-bit KV caches ----------------------------------------------------------

FP8_KV = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_dtype", FP8_KV, ids=str)
def test_cpu_fp8_kv_cache(kv_dtype: torch.dtype, dtype: torch.dtype) -> None:
    backend = CPUAttentionBackend()
    caps = CPUPlatform().capabilities
    assert caps.supports_kv_cache_dtype(kv_dtype)
    # The CPU quantizes with torch itself: no element may be a step off.
    assert cf.check_write_kv_fp8(backend, kv_dtype, dtype=dtype) == 0
    cf.check_copy_blocks(backend, dtype=dtype, kv_cache_dtype=kv_dtype)
    assert cf.check_attention_backend(backend, dtype=dtype, capabilities=caps,
                                      kv_cache_dtype=kv_dtype) == []


class _IgnoresKScale(CPUAttentionBackend):
    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None,  # noqa: ANN001, ANN201
                k_scale=1.0, v_scale=1.0):
        return super().forward(query, kv_cache, metadata, scale=scale,
                                sliding_window=sliding_window, v_scale=v_scale)


class _IgnoresVScale(CPUAttentionBackend):
    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None,  # noqa: ANN001, ANN201
                k_scale=1.0, v_scale=1.0):
        return super().forward(query, kv_cache, metadata, scale=scale,
                                sliding_window=sliding_window, k_scale=k_scale)


class _CastsWithoutSaturating(CPUAttentionBackend):
    def write_kv(self, key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):  # noqa: ANN001, ANN201
        flat = kv_cache.view(torch.uint8).view(2, kv_cache.shape[1], -1, kv_cache.shape[-1])
        keep = slot_mapping >= 0
        for i, x, s in ((0, key, k_scale), (1, value, v_scale)):
            q = (x[keep].float() / s).to(kv_cache.dtype).view(torch.uint8)
            flat[i][:, slot_mapping[keep]] = q.transpose(0, 1)


@pytest.mark.parametrize("mutant", [_IgnoresKScale, _IgnoresVScale])
def test_fp8_attention_check_catches_an_ignored_scale(mutant) -> None:  # noqa: ANN001
    with pytest.raises(AssertionError, match="fp8|float8"):
        cf.check_attention_backend(mutant(), cases=cf.QUICK_CASES,
                                   kv_cache_dtype=torch.float8_e4m3fn)


def test_fp8_write_check_catches_a_cast_without_saturation() -> None:
    # e5m2 overflows to inf under a plain cast (e4m3fn has no inf: torch clips it).
    with pytest.raises(AssertionError, match="not saturated"):
        cf.check_write_kv_fp8(_CastsWithoutSaturating(), torch.float8_e5m2)
