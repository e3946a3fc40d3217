"""IPEX's paged attention against pllm's reference, for both decode
operators (the varlen one, the default, and the single-query one), fp32 and
bf16, the model's dtype and the e5m2 cache; and the shape checks that stand
between a wrong call and a corrupted heap."""

from __future__ import annotations

import pytest
import torch

from pllm.platforms.ipex.attention import DECODE_KERNELS, IPEXAttentionBackend
from pllm.platforms.ipex.platform import IPEXPlatform
from pllm.testing import cache_checks, conformance
from pllm.testing.attention_checks import DEFAULT_CASES, AttentionCase, check_attention_backend
from pllm.testing.metadata import build_metadata

CAPS = IPEXPlatform().capabilities if IPEXPlatform.detect().available else None


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.float8_e5m2], ids=["model", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decode_kernel", DECODE_KERNELS)
def test_attention_matches_reference(decode_kernel, dtype, kv_cache_dtype):
    backend = IPEXAttentionBackend(decode_kernel)
    skipped = check_attention_backend(backend, dtype=dtype, capabilities=CAPS,
                                      kv_cache_dtype=kv_cache_dtype)
    assert len(skipped) < len(DEFAULT_CASES), skipped


# Every block size the platform claims, and head sizes other than 64.
SHAPES = tuple(
    AttentionCase(f"block_{bs}_head_{d}", ((bs - 1, 1), (2 * bs, 1), (0, bs + 3), (bs + 1, 5)),
                  num_heads=6, num_kv_heads=2, head_dim=d, block_size=bs, sliding_window=window)
    for bs, d, window in ((8, 80, None), (32, 96, 20), (64, 128, None), (128, 256, None),
                          (16, 32, 7)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decode_kernel", DECODE_KERNELS)
def test_block_sizes_and_head_sizes(decode_kernel, dtype):
    skipped = check_attention_backend(IPEXAttentionBackend(decode_kernel), dtype=dtype,
                                      capabilities=CAPS, cases=SHAPES)
    assert not skipped, skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_writes_and_block_copies(dtype):
    backend = IPEXAttentionBackend()
    cache_checks.check_write_kv(backend, dtype=dtype)
    cache_checks.check_copy_blocks(backend, dtype=dtype)
    assert cache_checks.check_write_kv_fp8(backend, torch.float8_e5m2, dtype=dtype) >= 0
    cache_checks.check_copy_blocks(backend, dtype=dtype, kv_cache_dtype=torch.float8_e5m2)


def test_wrong_shapes_raise_instead_of_reaching_the_operators():
    backend = IPEXAttentionBackend()
    cache = torch.zeros(backend.kv_cache_shape(4, 16, 2, 64))
    key = torch.randn(3, 2, 64)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"contiguous \[2, blocks, kv_heads"):
        backend.write_kv(key, key, cache.transpose(2, 3), slots)  # the docstring's layout
    with pytest.raises(ValueError, match=r"the cache holds \[tokens, 2, 64\]"):
        backend.write_kv(torch.randn(3, 4, 64), key, cache, slots)
    with pytest.raises(ValueError, match="is torch.bfloat16, the cache torch.float32"):
        backend.write_kv(key.bfloat16(), key.bfloat16(), cache, slots)
    with pytest.raises(ValueError, match="slot 64 is past the cache's 64 slots"):
        backend.write_kv(key, key, cache, torch.tensor([0, 64, 1]))
    with pytest.raises(ValueError, match="3 keys, 3 values and"):
        backend.write_kv(key, key, cache, torch.tensor([0, 1]))
    metadata = build_metadata([(5, 1), (0, 7)], 16, 4)  # 8 query rows
    with pytest.raises(ValueError, match="span 8 query rows, the query has 6"):
        backend.forward(torch.randn(6, 4, 64), cache, metadata, scale=0.125)
    with pytest.raises(ValueError, match="query is .6, 3, 64., the cache holds 2 KV heads"):
        backend.forward(torch.randn(6, 3, 64), cache, metadata, scale=0.125)


def test_unknown_decode_kernel_is_refused(monkeypatch):
    monkeypatch.setenv("PLLM_IPEX_DECODE_KERNEL", "fast")
    with pytest.raises(ValueError, match="one of varlen, single-query"):
        IPEXAttentionBackend()


def test_conformance_suite_basics():
    platform = IPEXPlatform()
    conformance.check_detection(IPEXPlatform)
    conformance.check_platform_basics(platform)
