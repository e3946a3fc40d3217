"""The reference PagedAttention is right (against a dense computation that
knows nothing of blocks), and the CPU backend matches the reference through
the shared harness (every default case, custom scale and large logits included)."""

from __future__ import annotations

import math

import pytest
import torch

from pllm.platforms.cpu.attention import CPUAttentionBackend
from pllm.testing.conformance import (
    DEFAULT_CASES,
    AttentionCase,
    build_metadata,
    check_attention_case,
    num_blocks_needed,
    reference_write_kv,
)
from pllm.testing.reference import reference_attention

CASES = [pytest.param(c, id=c.name) for c in DEFAULT_CASES]


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """One sequence, float64, loops over heads: ``q`` holds the last
    ``len(q)`` positions of the ``len(k)`` keys; GQA by ``head // group``."""
    q, k, v = q.double(), k.double(), v.double()
    q_len, num_heads, _ = q.shape
    seq_len, group = k.shape[0], num_heads // k.shape[1]
    out = torch.empty_like(q)
    for h in range(num_heads):
        for i in range(q_len):
            pos = seq_len - q_len + i
            lo = 0 if window is None else max(0, pos - window + 1)
            keys, values = k[lo : pos + 1, h // group], v[lo : pos + 1, h // group]
            weights = torch.softmax(keys @ q[i, h] * scale, dim=0)
            out[i, h] = weights @ values
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_dense(case: AttentionCase) -> None:
    gen = torch.Generator().manual_seed(3)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    num_blocks = 2 * num_blocks_needed(case.seqs, bs)
    md = build_metadata(case.seqs, bs, num_blocks, generator=gen)
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=gen) * 30  # stale everywhere
    tables = md.block_tables
    keys, values, queries = [], [], []
    for s, (cached, new) in enumerate(case.seqs):
        n = cached + new
        k, v = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
        slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for p in range(n)])
        reference_write_kv(k, v, cache, slots)
        keys.append(k), values.append(v)
        queries.append(torch.randn(new, case.num_heads, d, generator=gen))
    scale = case.softmax_scale
    got = reference_attention(
        torch.cat(queries), cache, md, scale=scale, sliding_window=case.sliding_window
    )
    want = torch.cat(
        [
            dense_attention(q, k, v, scale, case.sliding_window)
            for q, k, v in zip(queries, keys, values, strict=True)
        ]
    )
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_reference_by_hand() -> None:
    """One query against two keys: softmax([1, 0]) mixes the two values."""
    md = build_metadata([(1, 1)], block_size=2, num_blocks=1)
    cache = torch.zeros(2, 1, 2, 1, 1)
    cache[0, 0, :, 0, 0] = torch.tensor([1.0, 0.0])  # keys
    cache[1, 0, :, 0, 0] = torch.tensor([10.0, 20.0])  # values
    out = reference_attention(torch.ones(1, 1, 1), cache, md, scale=1.0)
    p = math.e / (math.e + 1)
    assert out.item() == pytest.approx(10 * p + 20 * (1 - p))
    windowed = reference_attention(torch.ones(1, 1, 1), cache, md, scale=1.0, sliding_window=1)
    assert windowed.item() == pytest.approx(20.0)  # only its own position


@pytest.mark.parametrize("case", CASES)
def test_cpu_backend_matches_reference_fp32(case: AttentionCase) -> None:
    check_attention_case(CPUAttentionBackend(), case, dtype=torch.float32)
