"""The XLA platforms' attention on ordinary CPU tensors (no torch_xla needed):
the pure-torch paged attention against the reference, the padding page, a
statically padded step, and the fit to the Pallas kernel's shapes with a
stand-in kernel. The kernel itself, under jax's interpreter, is checked in
tests/platforms/xla (the xla leg)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pllm.core.interfaces import AttentionMetadata
from pllm.platforms.common.xla import paged
from pllm.platforms.common.xla.attention import XLAPagedAttention
from pllm.platforms.common.xla.pallas import kernel_fit
from pllm.testing.attention_checks import (
    DEFAULT_CASES,
    AttentionCase,
    check_attention_backend,
    run_attention_case,
)

SMOLLM2 = AttentionCase("smollm2_mixed", ((20, 1), (15, 1), (0, 19), (7, 12)),
                        num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_matches_the_reference(dtype):
    skipped = check_attention_backend(XLAPagedAttention(), dtype=dtype,
                                      cases=(*DEFAULT_CASES, SMOLLM2))
    assert all("large logits" in s for s in skipped)


def test_context_walked_in_chunks_matches_the_reference():
    """A gather budget of one block per chunk: the online softmax over many
    chunks (what a long max_model_len does) gives the same result."""
    check_attention_backend(XLAPagedAttention(gather_budget=1), cases=DEFAULT_CASES[:4])


def test_padding_tokens_write_the_padding_page_only():
    cache = torch.zeros(paged.xla_kv_cache_shape(4, 2, 1, 3))  # 4 blocks + padding page
    assert cache.shape == (10, 2, 3) and paged.pages(cache, 2).shape == (5, 2, 2, 3)
    key, value = torch.ones(5, 1, 3), 2 * torch.ones(5, 1, 3)
    paged.write_kv(key, value, cache, torch.tensor([3, -1, 0, -1, -1]), block_size=2)
    flat = cache
    assert flat[3, 0].eq(1).all() and flat[3, 1].eq(2).all()  # K, V interleaved
    assert flat[0, 0].eq(1).all() and flat[0, 1].eq(2).all()
    live = torch.ones(10, dtype=torch.bool)
    live[[0, 3, 8, 9]] = False
    assert flat[live].eq(0).all()  # no other live slot touched
    assert flat[8:].eq(torch.tensor([1.0, 2.0]).view(1, 2, 1)).all()  # the padding page


def _padded(md: AttentionMetadata, num_tokens: int, num_seqs: int, width: int):
    """``md`` padded as the runner pads a static-shape step."""
    real_tokens, real_seqs = md.num_tokens, md.num_seqs
    end = md.query_start_loc[-1:]
    qsl = torch.cat([md.query_start_loc, end.repeat(num_seqs - real_seqs)])
    seq_lens = torch.cat([md.seq_lens, md.seq_lens.new_zeros(num_seqs - real_seqs)])
    tables = torch.zeros(num_seqs, width, dtype=torch.int32)
    tables[:real_seqs, : md.block_tables.shape[1]] = md.block_tables
    slots = torch.cat([md.slot_mapping, md.slot_mapping.new_full((num_tokens - real_tokens,), -1)])
    return dataclasses.replace(md, num_tokens=num_tokens, num_seqs=num_seqs, query_start_loc=qsl,
                               seq_lens=seq_lens, block_tables=tables, slot_mapping=slots,
                               extras={})


def test_a_statically_padded_step_changes_no_real_row():
    """Empty sequences, padding tokens and full-width block tables: the real
    rows come out as unpadded, the padding rows are zero."""
    backend = XLAPagedAttention()
    run = run_attention_case(backend, DEFAULT_CASES[2])  # decodes and prefill chunks
    md = run.metadata
    padded = backend.prepare_metadata(_padded(md, num_tokens=64, num_seqs=8, width=16))
    query = torch.cat([run.query, torch.randn(64 - md.num_tokens, *run.query.shape[1:])])
    out = backend.forward(query, run.cache, padded, scale=DEFAULT_CASES[2].softmax_scale)
    torch.testing.assert_close(out[: md.num_tokens], run.out)
    assert out[md.num_tokens:].eq(0).all()


def test_kernel_fit_pads_to_what_the_kernel_tiles():
    smol = kernel_fit(3, 64)
    assert (smol.num_kv_heads, smol.head_dim) == (4, 128) and smol.padded
    assert smol.memory_factor == pytest.approx(128 * 4 / (64 * 3))
    assert "head_dim 64 -> 128" in smol.describe() and "KV heads 3 -> 4" in smol.describe()
    for kv in (1, 2, 4, 8, 16, 32):
        fit = kernel_fit(kv, 128)
        assert not fit.padded and fit.describe() == "the model's shapes fit the kernel as they are"
    assert kernel_fit(5, 256).num_kv_heads == 8 and kernel_fit(12, 128).num_kv_heads == 16
    assert kernel_fit(8, 80).head_dim == 128 and kernel_fit(8, 192).head_dim == 256


def _stand_in_kernel(calls: list):
    """The TPU kernel's signature over the torch path, refusing what the real
    kernel refuses: checks that the adapter pads and cuts back correctly."""

    def kernel(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
               sliding_window=None, soft_cap=None):
        combined, head_dim = kv_pages.shape[2], kv_pages.shape[3]
        if kernel_fit(combined // 2, head_dim).padded:
            raise ValueError(f"kernel refuses {combined} combined heads, head_dim {head_dim}")
        assert q.shape[2] == head_dim and q.shape[1] % (combined // 2) == 0
        assert kv_lens.dtype == page_indices.dtype == cu_q_lens.dtype == torch.int32
        calls.append((tuple(q.shape), tuple(kv_pages.shape), int(num_seqs[0])))
        tokens = paged.TokenMap.build(q.shape[0], cu_q_lens, kv_lens, page_indices)
        flat = kv_pages.reshape(-1, *kv_pages.shape[2:])
        return paged.paged_attention(q, flat, tokens, kv_pages.shape[1], scale=sm_scale,
                                     sliding_window=sliding_window, soft_cap=soft_cap)

    return kernel


@pytest.mark.parametrize("case", [SMOLLM2, DEFAULT_CASES[3], DEFAULT_CASES[1]],
                         ids=lambda c: c.name)
def test_kernel_path_pads_heads_and_head_dim(case):
    calls = []
    backend = XLAPagedAttention(_stand_in_kernel(calls), kernel_name="stand-in")
    run = run_attention_case(backend, case)
    assert run.mismatch() is None, run.mismatch()
    fit = kernel_fit(case.num_kv_heads, case.head_dim)
    assert run.cache.shape[1:] == (2 * fit.num_kv_heads, fit.head_dim)
    group = case.num_heads // case.num_kv_heads
    assert calls[-1][0] == (run.metadata.num_tokens, fit.num_kv_heads * group, fit.head_dim)
    assert calls[-1][2] == len(case.seqs)  # num_seqs: the real sequences


def test_kernel_num_seqs_excludes_padding_sequences():
    calls = []
    backend = XLAPagedAttention(_stand_in_kernel(calls), kernel_name="stand-in")
    run = run_attention_case(backend, DEFAULT_CASES[2])
    padded = backend.prepare_metadata(_padded(run.metadata, num_tokens=64, num_seqs=8, width=16))
    query = torch.cat([run.query, torch.zeros(64 - run.metadata.num_tokens, *run.query.shape[1:])])
    out = backend.forward(query, run.cache, padded, scale=DEFAULT_CASES[2].softmax_scale)
    torch.testing.assert_close(out[: run.metadata.num_tokens], run.out)
    assert calls[-1][2] == len(DEFAULT_CASES[2].seqs)


def test_padding_storage_passes_the_conformance_write_and_copy_checks():
    """The padding page is outside block_storage: the generic checks accept
    a backend that writes padding there, and copy whole pages."""
    from pllm.testing import conformance as cf

    backend = XLAPagedAttention()
    cf.check_write_kv(backend)
    cf.check_copy_blocks(backend)
