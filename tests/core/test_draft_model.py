"""Speculative decoding with a draft model (``pllm.core.draft``): greedy
tokens identical to the target's alone for a draft that always agrees (the
target itself), one that often does (the target with noise) and one that
almost never does (another random model); under chunked prefill, prefix
hits and preemption a draft that always agrees keeps every draft, which
holds only if its own cache is right after each of them; no leaked blocks;
a draft the target cannot verify is refused by name. On the fake platform;
two tensor-parallel ranks and 8-bit caches are in the CPU's tests."""

from __future__ import annotations

import pytest
from engine_utils import assert_one_distribution, generate_all

from pllm import LLM, SamplingParams
from pllm.loader import ModelLoadError
from pllm.loader.testing import make_draft_copy, make_tiny_model

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [30, 31, 30, 31, 30], list(range(40, 100)),
           [9] * 20, [12, 13, 14]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(tiny_llm):
    return _tokens(generate_all(tiny_llm.llm_engine, PROMPTS, GREEDY))


@pytest.fixture(scope="module")
def drafts(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafts")
    return {
        "itself": tiny_model_dir,
        "noisy": make_draft_copy(tiny_model_dir, folder / "noisy", noise=0.2),
        "other": make_tiny_model(folder / "other", seed=1, num_hidden_layers=1),
    }


def _llm(target: str, draft: str, k: int = 3, **kwargs) -> LLM:
    kwargs = {"kv_cache_memory": "16MB", "max_model_len": 128, **kwargs}
    return LLM(target, device="fakeaccel", **kwargs, speculative_config={
        "method": "draft_model", "model": draft, "num_speculative_tokens": k})


@pytest.mark.parametrize("which", ["itself", "noisy", "other"])
def test_a_draft_model_gives_the_targets_greedy_tokens(tiny_model_dir, drafts, reference, which):
    llm = _llm(tiny_model_dir, drafts[which])
    try:
        engine = llm.llm_engine
        free = engine.kv.pool.num_free_blocks
        assert _tokens(generate_all(engine, PROMPTS, GREEDY)) == reference
        spec = engine.get_stats().spec_decode
        assert spec.num_draft_tokens > 0
        if which == "itself":  # every draft kept, and a bonus token: 4 tokens a step
            assert spec.acceptance_rate == 1.0
            assert spec.mean_accepted_length > 3.5
        elif which == "noisy":
            assert 0.1 < spec.acceptance_rate < 0.9, spec
        else:
            assert spec.acceptance_rate < 0.1, spec
        assert engine.kv.pool.num_free_blocks == free
    finally:
        llm.shutdown()


@pytest.mark.parametrize("which", ["itself", "noisy"])
def test_draft_model_under_chunked_prefill_prefix_hits_and_preemption(tiny_model_dir, drafts,
                                                                      reference, which):
    """A small step budget (chunks, which the draft computes with the
    target), the same prompts twice (prefix hits: the cached blocks must
    hold the draft's K/V too) and a cache too small for all at once
    (preemption: both recompute). A draft that is the target keeps every
    draft only if its cache is right through all of it."""
    # Both models' K/V in each block: half the blocks the target alone gets.
    llm = _llm(tiny_model_dir, drafts[which], kv_cache_memory="160KiB", block_size=8,
               max_num_batched_tokens=32)
    try:
        engine = llm.llm_engine
        target_block = 2 * 8 * 2 * 16 * 4 * 2  # K and V, 8 tokens, 2 heads of 16, fp32, 2 layers
        assert engine.kv.num_total_blocks == 160 * 1024 // (2 * target_block)
        free = engine.kv.pool.num_free_blocks
        assert _tokens(generate_all(engine, PROMPTS + PROMPTS, GREEDY)) == reference + reference
        # Prompts that carry the answers' first tokens hit blocks the
        # answers filled, some in steps that kept every draft.
        longer = [p + r[:16] for p, r in zip(PROMPTS, reference)]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        assert _tokens(generate_all(engine, longer, params)) == [r[16:24] for r in reference]
        stats = engine.get_stats()
        assert stats.num_preemptions > 0, "the cache was meant to be too small for every request"
        assert stats.prefix_cache_hits > 0
        if which == "itself":
            assert stats.spec_decode.acceptance_rate == 1.0, stats.spec_decode
        else:
            assert stats.spec_decode.num_accepted_tokens > 0
        assert engine.kv.pool.num_free_blocks == free
    finally:
        llm.shutdown()


def test_sampled_requests_with_n_logprobs_and_stops_under_a_draft_model(tiny_model_dir, drafts,
                                                                       reference):
    llm = _llm(tiny_model_dir, drafts["noisy"], k=4)
    try:
        engine = llm.llm_engine
        params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, n=2, logprobs=2,
                                seed=3, ignore_eos=True)
        outs = generate_all(engine, PROMPTS[:2], params)
        for out in outs:
            assert len(out.outputs) == 2
            for sample in out.outputs:
                assert len(sample.token_ids) == 16 == len(sample.logprobs)
                for token, entry in zip(sample.token_ids, sample.logprobs):
                    assert token in entry and entry[token].logprob <= 0
        again = generate_all(engine, PROMPTS[:2], params)  # seeded: reproducible
        assert [[s.token_ids for s in o.outputs] for o in outs] == \
            [[s.token_ids for s in o.outputs] for o in again]
        # A stop token and max_tokens inside an accepted run: nothing past them.
        answer = reference[2]
        stop_at = answer[6]
        (out,) = generate_all(engine, [PROMPTS[2]], SamplingParams(
            max_tokens=24, temperature=0.0, stop_token_ids=[stop_at]))
        assert out.outputs[0].token_ids == answer[: answer.index(stop_at) + 1]
        (out,) = generate_all(engine, [PROMPTS[2]], SamplingParams(max_tokens=7, temperature=0.0,
                                                                ignore_eos=True))
        assert out.outputs[0].token_ids == answer[:7]
        assert engine.get_stats().spec_decode.num_accepted_tokens > 0
    finally:
        llm.shutdown()


def test_a_draft_the_target_cannot_verify_is_refused_by_name(tiny_model_dir, tmp_path):
    wider = make_tiny_model(tmp_path / "wider", vocab_size=384)
    with pytest.raises(ValueError, match=r"draft model .*wider has a vocabulary of 384 tokens, "
                                         r"the target 320"):
        _llm(tiny_model_dir, wider)
    with pytest.raises(ModelLoadError, match="missing"):
        _llm(tiny_model_dir, str(tmp_path / "missing"))
    # A draft the platform cannot run (this one has no attention soft-cap) is
    # refused by name before it loads, as a served model would be.
    capped = make_tiny_model(tmp_path / "capped", arch="gemma2", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match=r"draft model .*capped: this gemma2 model soft-caps its "
                                         r"attention logits \(at 50.0\), which fakeaccel"):
        _llm(tiny_model_dir, capped)



def test_a_block_is_cached_once_both_models_computed_it(tiny_model_dir, drafts):
    """After a step that kept all its drafts the draft model is one token
    behind (its last draft was never its input): a block that step filled
    joins the prefix cache (which stands for both caches) only after the
    next step's catch-up."""
    llm = _llm(tiny_model_dir, drafts["itself"], block_size=8)
    try:
        engine = llm.llm_engine
        engine.add_request("a", [11, 12, 13, 14], SamplingParams(max_tokens=20, temperature=0.0,
                                                                 ignore_eos=True))
        engine.step()  # the prompt, and the first token
        (seq,) = engine.scheduler.running
        assert (seq.num_computed_tokens, seq.num_draft_computed, seq.num_cached_blocks) == (4, 4, 0)
        engine.step()  # the first token and 3 drafts, all kept, and a bonus token
        assert (seq.num_computed_tokens, seq.num_draft_computed, seq.num_tokens) == (8, 7, 9)
        assert seq.num_cached_blocks == 0
        engine.step()  # the draft catches up on 2 tokens
        assert (seq.num_computed_tokens, seq.num_draft_computed) == (12, 11)
        assert seq.num_cached_blocks == 1
        engine.abort_request("a")
    finally:
        llm.shutdown()


def test_sampled_drafts_keep_the_targets_distribution(tiny_llm, tiny_model_dir, drafts):
    """Many seeded requests; with a draft model their second token is its
    draw from ``q`` (the draft's top-4 at temperature 1), accepted with
    min(1, p/q) or replaced from the residual max(0, p - q). The (first,
    second) token pairs with and without the draft are one distribution
    (chi-square test of homogeneity at 0.999); a residual that only took
    the draft out, as for a point mass, fails it."""
    from collections import Counter

    num = 1500
    prompt = PROMPTS[1]

    def pairs(engine, seed0: int) -> Counter:
        for i in range(num):
            engine.add_request(f"s{i}", prompt, SamplingParams(
                max_tokens=3, temperature=1.0, top_k=4, seed=seed0 + i, ignore_eos=True))
        got = Counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[tuple(out.outputs[0].token_ids[:2])] += 1
        return got

    plain = pairs(tiny_llm.llm_engine, 0)
    llm = _llm(tiny_model_dir, drafts["noisy"], k=1, max_num_seqs=256)
    try:
        drafted = pairs(llm.llm_engine, 10**6)
        spec = llm.llm_engine.get_stats().spec_decode
    finally:
        llm.shutdown()
    assert spec.num_draft_tokens == num and 0 < spec.num_accepted_tokens < num, spec
    assert_one_distribution(plain, drafted, num)


def test_speculation_off_at_large_batches_and_the_draft_catches_up(tiny_llm, tiny_model_dir,
                                                                   drafts, caplog):
    """``disable_by_batch_size``: no drafts, and no draft-model work at all,
    while 3 or more sequences run; as requests finish it is on again and the
    draft catches up on everything it missed (prompts included), a 32-token
    budget at a time, its drafts dropped until it has. A draft that is the
    target then keeps every draft, which it does only if its catch-up left
    its cache right."""
    import logging

    lengths = [4, 6, 10, 18, 30]
    want = [_tokens(generate_all(tiny_llm.llm_engine, [p], SamplingParams(
        max_tokens=n, temperature=0.0, ignore_eos=True)))[0] for p, n in zip(PROMPTS, lengths)]
    llm = LLM(tiny_model_dir, device="fakeaccel", kv_cache_memory="16MB", max_model_len=128,
              max_num_batched_tokens=32, speculative_config={
                  "method": "draft_model", "model": drafts["itself"], "num_speculative_tokens": 3,
                  "disable_by_batch_size": 3})
    try:
        engine = llm.llm_engine
        seen = []
        orig = engine.scheduler.schedule

        def schedule(*args, **kwargs):
            running = len(engine.scheduler.running)  # as the step starts
            out = orig(*args, **kwargs)
            seen.append((running, sum(len(i.draft) for i in out.scheduled),
                         any(i.draft_catch_up for i in out.scheduled)))
            return out

        engine.scheduler.schedule = schedule
        with caplog.at_level(logging.INFO, logger="pllm"):
            for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
                engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0,
                                                                   ignore_eos=True))
            done = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
        assert [done[f"r{i}"] for i in range(len(PROMPTS))] == want
        crowded = [s for s in seen if s[0] >= 3]
        assert crowded and not any(drafted or ran for _, drafted, ran in crowded)
        assert any(drafted for running, drafted, _ in seen if running < 3)
        spec = engine.get_stats().spec_decode
        assert spec.acceptance_rate == 1.0, spec
        assert "speculative decoding off: 3 sequences running" in caplog.text
        assert "speculative decoding on again" in caplog.text
        stats = engine.get_stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.shutdown()
