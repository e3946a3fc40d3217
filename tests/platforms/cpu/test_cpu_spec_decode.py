"""Speculative decoding on the CPU platform: a draft's rows are decode rows,
served by the one-call decode layers, with the same greedy tokens."""

from __future__ import annotations

import pytest

from pllm import LLM, SamplingParams
from pllm.core.config import SpeculativeConfig
from pllm.core.spec_decode import NgramProposer

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [30, 31, 30, 31, 30], list(range(40, 100)), [9] * 20]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def cpu_llm(tiny_model_dir):
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", max_model_len=128)
    yield llm
    llm.shutdown()


class _Truth:
    """Drafts the true greedy continuation (every one accepted)."""

    def __init__(self, answers):
        self.answers = answers

    def propose(self, seq, max_drafts):
        answer = self.answers[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        return answer[seq.num_output_tokens: seq.num_output_tokens + min(3, max_drafts)]


def _tokens(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_draft_rows_take_the_one_call_decode_layers(cpu_llm, monkeypatch):
    from pllm.platforms.cpu.layers import CPUFusedDecodeLayer

    sched = cpu_llm.llm_engine.scheduler
    reference = _tokens(cpu_llm, PROMPTS)
    fused_rows = []
    original = CPUFusedDecodeLayer.__call__

    def recording(self, positions, x, residual, ctx):
        out = original(self, positions, x, residual, ctx)
        if out is not None:
            fused_rows.append(x.shape[0])
        return out

    monkeypatch.setattr(CPUFusedDecodeLayer, "__call__", recording)
    for proposer in (_Truth({tuple(p): r for p, r in zip(PROMPTS, reference)}),
                     NgramProposer(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1,
                                                     prompt_lookup_max=3))):
        sched.proposer = proposer
        try:
            assert _tokens(cpu_llm, PROMPTS) == reference
            assert _tokens(cpu_llm, PROMPTS[:1]) == reference[:1]
        finally:
            sched.proposer = None
    assert 4 in fused_rows  # one request: its last token and 3 drafts, as 4 decode rows
    assert sched.spec_stats.num_accepted_tokens > 0
    stats = cpu_llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_speculation_over_an_8bit_cache_gives_its_greedy_tokens(tiny_model_dir, kv_cache_dtype):
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", max_model_len=128,
              kv_cache_dtype=kv_cache_dtype)
    try:
        reference = _tokens(llm, PROMPTS)
        sched = llm.llm_engine.scheduler
        sched.proposer = _Truth({tuple(p): r for p, r in zip(PROMPTS, reference)})
        assert _tokens(llm, PROMPTS) == reference
        assert sched.spec_stats.num_accepted_tokens > 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_a_draft_model_on_the_cpu_gives_the_targets_greedy_tokens(cpu_llm, tiny_model_dir,
                                                                 tmp_path_factory, kv_cache_dtype):
    """The draft model's passes on the CPU's kernels (its catch-up chunks
    and decode rows), its cache in the target's dtype, an 8-bit one too: a
    draft that is the target keeps every draft."""
    reference = _tokens(cpu_llm, PROMPTS)
    if kv_cache_dtype != "auto":
        with_fp8 = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", max_model_len=128,
                       kv_cache_dtype=kv_cache_dtype)
        try:
            reference = _tokens(with_fp8, PROMPTS)
        finally:
            with_fp8.shutdown()
    spec = {"method": "draft_model", "model": tiny_model_dir, "num_speculative_tokens": 3}
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", max_model_len=128,
              kv_cache_dtype=kv_cache_dtype, speculative_config=spec)
    try:
        assert _tokens(llm, PROMPTS) == reference
        stats = llm.llm_engine.get_stats()
        assert stats.spec_decode.acceptance_rate == 1.0, stats.spec_decode
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.shutdown()
