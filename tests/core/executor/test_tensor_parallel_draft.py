"""Speculative decoding with a draft model under two tensor-parallel ranks
(a module of its own: one process holds one tensor-parallel engine at a time)."""

from __future__ import annotations

import random

import torch
from parity import hf_greedy
from transformers import AutoModelForCausalLM

from pllm import LLM, SamplingParams
from pllm.loader.testing import make_draft_copy

MAX_NEW = 20
PROMPT_LENS = [5, 17, 40, 3]


def test_a_draft_model_under_two_ranks_matches_transformers(tiny_model_dir, tmp_path):
    """The draft model sharded as the target, its passes run on both ranks
    from rank 0's plan (catch-up chunks under a 16-token budget, then
    decode rows): transformers' greedy tokens, some drafts kept."""
    draft = make_draft_copy(tiny_model_dir, tmp_path / "draft", noise=0.2)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in PROMPT_LENS]
    expected = hf_greedy(hf, prompts, MAX_NEW)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    sampled = SamplingParams(temperature=1.0, top_k=8, seed=5, max_tokens=MAX_NEW,
                             ignore_eos=True)
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", tensor_parallel_size=2,
              max_num_batched_tokens=16, speculative_config=spec)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        stats = llm.llm_engine.get_stats()
        assert stats.spec_decode.num_accepted_tokens > 0, stats.spec_decode
        assert stats.num_free_blocks == stats.num_total_blocks, stats
        # Sampled drafts: both ranks draw the same ones (or rank 1 would feed
        # other tokens and the step's sums would mix two sequences), so the
        # seeded samples are one rank's.
        two_ranks = [o.outputs[0].token_ids for o in llm.generate(prompts, sampled,
                                                                  use_tqdm=False)]
    finally:
        llm.shutdown()
    one = LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", max_num_batched_tokens=16,
              speculative_config=spec)
    try:
        assert [o.outputs[0].token_ids for o in one.generate(prompts, sampled,
                                                             use_tqdm=False)] == two_ranks
    finally:
        one.shutdown()
