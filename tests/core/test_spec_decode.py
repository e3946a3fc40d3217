"""Speculative decoding: the n-gram proposer, the verifier's exactness
(greedy: the drafts equal to the argmax; sampled: the target's own
distribution, by a chi-square test), and the engine's outputs with and
without speculation: identical greedy tokens under batching, chunked
prefill, prefix hits and preemption, scripted proposers that are always
right or always wrong, and no leaked blocks. The engine tests run on the
fake platform (the reference attention, a cache layout of its own); the
CPU platform's are in tests/platforms/cpu/test_cpu_spec_decode.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from engine_utils import assert_one_distribution, generate_all

from pllm import LLM, SamplingParams
from pllm.core.config import SpeculativeConfig
from pllm.core.sampler import SamplingMetadata, _filter, verify
from pllm.core.spec_decode import NgramProposer, accepted_tokens, ngram_propose
from pllm.entrypoints.engine_args import EngineArgs

# ---------------------------------------------------------------- the proposer


@pytest.mark.parametrize("tokens, lo, hi, k, want", [
    ([1, 2, 3, 4, 1, 2, 3], 1, 3, 3, [4, 1, 2]),  # "1 2 3" seen before: what followed it
    ([1, 2, 3, 4, 1, 2, 3], 1, 3, 1, [4]),
    ([5, 6, 7], 1, 2, 2, []),  # nothing repeats
    ([1, 2, 9, 2], 2, 2, 2, []),  # only a 1-token match, below prompt_lookup_min
    ([1, 2, 9, 2], 1, 2, 2, [9, 2]),
    ([7, 1, 2, 8, 8, 1, 2], 1, 2, 2, [8, 8]),  # the longest suffix first ("1 2", not "2")
    ([1, 5, 1, 6, 1, 7, 1], 1, 1, 1, [7]),  # the latest match with k tokens after it
    ([1, 1, 1, 1], 1, 2, 2, [1, 1]),  # overlapping matches
    ([3], 1, 4, 2, []),
])
def test_ngram_proposals(tokens, lo, hi, k, want):
    assert ngram_propose(tokens, lo, hi, k) == want


def test_speculative_config_is_vllms_json_and_bad_values_name_the_problem():
    cfg = SpeculativeConfig.from_dict('{"method": "ngram", "num_speculative_tokens": 3, '
                                      '"prompt_lookup_max": 4}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (3, 4, 4)
    assert SpeculativeConfig.from_dict({"num_speculative_tokens": 2}).prompt_lookup_max == 5
    draft = SpeculativeConfig.from_dict({"model": "small", "num_speculative_tokens": 3})
    assert (draft.method, draft.model, draft.prompt_lookup_max) == ("draft_model", "small", None)
    for bad, message in [
        ({}, "needs num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, ">= 1"),
        ({"num_speculative_tokens": "2"}, "must be an integer"),
        ({"num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
         "prompt_lookup_min <= prompt_lookup_max"),
        ({"num_speculative_tokens": 2, "colour": 1}, "unknown key"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "not one of ngram"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
        ({"num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size must be >= 1"),
        ({"num_speculative_tokens": 2, "disable_by_batch_size": 2.5}, "must be an integer"),
        ({"method": "draft_model", "model": "d", "num_speculative_tokens": 2,
          "prompt_lookup_max": 3}, "ngram method's"),
        ({"method": "ngram", "model": "d", "num_speculative_tokens": 2}, "draft_model method's"),
        ({"model": 7, "num_speculative_tokens": 2}, "model must be a string"),
        ("{oops", "not JSON"),
    ]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.from_dict(bad)


def test_cli_flag_is_checked_when_parsed():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--speculative-config", '{"num_speculative_tokens": 2}'])
    assert EngineArgs.from_cli_args(args).create_engine_config().speculative.num_speculative_tokens == 2
    with pytest.raises(SystemExit), contextlib.redirect_stderr(None):
        parser.parse_args(["--speculative-config", '{"num_speculative_tokens": -1}'])


# ---------------------------------------------------------------- the verifier


def test_accepted_tokens_keep_the_drafts_up_to_the_first_rejection():
    assert accepted_tokens([4, 5, 6], [True, True, True], [0, 0, 0, 9]) == [4, 5, 6, 9]
    assert accepted_tokens([4, 5, 6], [True, False, True], [0, 7, 0, 9]) == [4, 7]
    assert accepted_tokens([4], [False], [3, 9]) == [3]


def test_greedy_rows_accept_exactly_the_drafts_equal_to_their_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top = logits.argmax(-1).tolist()
    md = SamplingMetadata(num_rows=4, all_greedy=True)
    result = verify(logits, md, [top[0], (top[1] + 1) % 50, top[2], -1])
    assert result.accepted == [True, False, True, False]
    assert result.token_ids == top


class _Seq:
    """What SamplingMetadata.build reads of a sequence."""

    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        from types import SimpleNamespace

        self.request = SimpleNamespace(params=params, eos_token_ids=frozenset())
        self.num_output_tokens = 5
        self.seed, self.generator = seed, None
        self.token_ids, self.output_token_ids = [], []


VERIFY_ROWS = 40_000
VERIFY_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0])


def _verified_counts(params: SamplingParams, drafts: torch.Tensor, q: torch.Tensor | None = None):
    """``verify`` on VERIFY_ROWS rows of the same target logits, one draft
    each (drawn from ``q`` when given, else point masses): how often each
    token was emitted, the target's filtered distribution ``p``, and the
    per-row verdicts."""
    vocab, rows = len(VERIFY_LOGITS), len(drafts)
    logits = VERIFY_LOGITS.expand(rows, vocab).contiguous()
    seqs = [_Seq(params)] * rows
    md = SamplingMetadata.build(seqs, vocab, torch.device("cpu"))
    want = _filter(VERIFY_LOGITS[None],
                   SamplingMetadata.build(seqs[:1], vocab, torch.device("cpu"))).softmax(-1)[0]
    result = verify(logits, md, drafts.tolist(), None if q is None else q.expand(rows, vocab))
    accepted = torch.tensor(result.accepted)
    emitted = torch.where(accepted, drafts, torch.tensor(result.token_ids))
    return torch.bincount(emitted, minlength=vocab).double(), want, accepted


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
])
@pytest.mark.parametrize("draft", [0, 3, 7])  # the likeliest, a middling and the least likely token
def test_a_sampled_row_emits_the_targets_own_distribution_whatever_the_draft(params, draft):
    """A row emits its draft when accepted, else its residual draw; over many
    rows that must be p itself. Leaving the draft in the residual (or not
    renormalising it) moves the draft's frequency by p(d)(1 - p(d)), which
    this test sees wherever the draft is possible (0 < p(d) < 1)."""
    torch.manual_seed(1)
    drafts = torch.full((VERIFY_ROWS,), draft)
    counts, want, accepted = _verified_counts(params, drafts)
    # chi-square with 7 degrees of freedom: 24.3 is its 0.999 quantile.
    assert _chi_square(counts, want.double()) < 24.3
    assert abs(accepted.double().mean() - want[draft]) < 0.01  # accepted with probability p(d)


def test_seeded_rows_verify_reproducibly():
    params = SamplingParams(temperature=1.0, seed=7)
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        seq = _Seq(params, seed=7)
        md = SamplingMetadata.build([seq] * 3, 40, torch.device("cpu"))
        result = verify(logits, md, [1, 2, -1])
        runs.append((result.accepted, result.token_ids))
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- the engine


@contextlib.contextmanager
def _speculating(engine, proposer):
    """``engine`` with ``proposer`` (fresh counters); checks no block leaked."""
    sched = engine.scheduler
    free = engine.kv.pool.num_free_blocks
    saved = sched.proposer, sched.spec_stats
    sched.proposer = proposer
    sched.spec_stats = type(saved[1])()
    try:
        yield sched.spec_stats
    finally:
        sched.proposer, sched.spec_stats = saved
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free_blocks == free


# Repetitive prompts (the tiny model's greedy continuations repeat, too), so
# the n-gram proposer finds matches; one prompt longer than a chunk.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [30, 31, 30, 31, 30], list(range(40, 100)),
           [9] * 20, [12, 13, 14]]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llm):
    engine = tiny_llm.llm_engine
    return [o.outputs[0].token_ids for o in generate_all(engine, PROMPTS, GREEDY)]


def test_ngram_speculation_gives_the_same_greedy_tokens(tiny_llm, reference):
    engine = tiny_llm.llm_engine
    ngram = NgramProposer(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1,
                                            prompt_lookup_max=3))
    with _speculating(engine, ngram) as stats:
        got = [o.outputs[0].token_ids for o in generate_all(engine, PROMPTS, GREEDY)]
    assert got == reference
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert stats.mean_accepted_length > 1


def test_ngram_speculation_is_off_while_the_batch_is_large(tiny_llm, reference):
    """disable_by_batch_size=4: with all five prompts running no drafts; as
    the batch shrinks below 4 they come back."""
    engine = tiny_llm.llm_engine
    ngram = NgramProposer(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_min=1,
                                            prompt_lookup_max=3, disable_by_batch_size=4))
    sched, drafted = engine.scheduler, []
    orig = sched.schedule

    def schedule(*args, **kwargs):
        running = len(sched.running)
        out = orig(*args, **kwargs)
        drafted.append((running, sum(len(i.draft) for i in out.scheduled)))
        return out

    sched.schedule = schedule
    try:
        with _speculating(engine, ngram) as stats:
            lengths = [4, 8, 12, 18, 24]
            for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
                engine.add_request(f"r{i}", prompt, SamplingParams(
                    max_tokens=n, temperature=0.0, ignore_eos=True))
            done = {}
            while engine.has_unfinished_requests():
                done.update({o.request_id: o for o in engine.step() if o.finished})
    finally:
        del sched.schedule
        sched.speculating = True
    got = [done[f"r{i}"].outputs[0].token_ids for i in range(len(PROMPTS))]
    assert got == [r[:n] for r, n in zip(reference, lengths)]
    assert any(running >= 4 for running, _ in drafted)
    assert all(n == 0 for running, n in drafted if running >= 4)
    assert stats.num_draft_tokens > 0


class _Repeat:
    """Always proposes: the last token, again and again (sometimes right)."""

    def propose(self, seq, max_drafts: int) -> list[int]:
        return [seq.token_ids[-1]] * min(3, max_drafts)


class _Scripted:
    """Drafts from a known answer: the true continuation, or tokens it never has."""

    def __init__(self, answers: dict[tuple[int, ...], list[int]], right: bool, k: int = 3) -> None:
        self.answers, self.right, self.k = answers, right, k

    def propose(self, seq, max_drafts: int) -> list[int]:
        answer = self.answers[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        done = seq.num_output_tokens
        nxt = answer[done: done + min(self.k, max_drafts)]
        return nxt if self.right else [(t + 1) % 300 for t in nxt]


@pytest.mark.parametrize("right", [True, False])
def test_always_right_and_always_wrong_drafts(tiny_llm, reference, right):
    engine = tiny_llm.llm_engine
    answers = {tuple(p): r for p, r in zip(PROMPTS, reference)}
    with _speculating(engine, _Scripted(answers, right)) as stats:
        got = [o.outputs[0].token_ids for o in generate_all(engine, PROMPTS, GREEDY)]
    assert got == reference
    assert stats.num_draft_tokens > 0
    if right:  # every draft kept, and a bonus token: 4 tokens a step
        assert stats.acceptance_rate == 1.0
        assert stats.mean_accepted_length > 3
    else:
        assert stats.num_accepted_tokens == 0
        assert stats.mean_accepted_length == 1.0


def test_stops_inside_an_accepted_run_keep_nothing_past_them(tiny_llm, reference):
    engine = tiny_llm.llm_engine
    answers = {tuple(p): r for p, r in zip(PROMPTS, reference)}
    prompt, answer = PROMPTS[2], reference[2]
    stop_at = answer[6]
    first = answer.index(stop_at)
    params = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_at])
    with _speculating(engine, _Scripted(answers, True, k=4)):
        (out,) = generate_all(engine, [prompt], params)
    assert out.outputs[0].token_ids == answer[: first + 1]
    assert out.outputs[0].finish_reason == "stop"
    # max_tokens inside a run: exactly max_tokens, never more.
    with _speculating(engine, _Scripted(answers, True, k=4)):
        (out,) = generate_all(engine, [prompt], SamplingParams(max_tokens=7, temperature=0.0,
                                                            ignore_eos=True))
    assert out.outputs[0].token_ids == answer[:7]


def test_speculation_under_chunked_prefill_prefix_hits_and_preemption(tiny_model_dir, reference):
    """A small step budget (chunks), the same prompts twice (prefix hits),
    and a KV cache too small for all at once (preemption)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 2}
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="80KB", block_size=8,
              max_model_len=128, max_num_batched_tokens=32, speculative_config=spec)
    engine = llm.llm_engine
    free = engine.kv.pool.num_free_blocks
    got = [o.outputs[0].token_ids for o in generate_all(engine, PROMPTS + PROMPTS, GREEDY)]
    assert got == reference + reference
    stats = engine.get_stats()
    assert stats.num_preemptions > 0, "the cache was meant to be too small for every request"
    assert stats.prefix_cache_hits > 0
    assert stats.spec_decode.num_accepted_tokens > 0
    assert engine.kv.pool.num_free_blocks == free
    llm.llm_engine.shutdown()


def test_sampled_requests_with_logprobs_and_n_run_under_speculation(tiny_llm):
    engine = tiny_llm.llm_engine
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, n=2, logprobs=2, seed=3,
                            ignore_eos=True)
    with _speculating(engine, _Repeat()) as stats:
        outs = generate_all(engine, PROMPTS[:2], params)
    assert stats.num_draft_tokens > 0
    for out in outs:
        assert len(out.outputs) == 2
        for sample in out.outputs:
            assert len(sample.token_ids) == 16
            assert len(sample.logprobs) == 16
            for token, entry in zip(sample.token_ids, sample.logprobs):
                assert token in entry and entry[token].logprob <= 0
    with _speculating(engine, _Repeat()):
        again = generate_all(engine, PROMPTS[:2], params)
    assert [[s.token_ids for s in o.outputs] for o in outs] == \
        [[s.token_ids for s in o.outputs] for o in again]  # seeded: reproducible


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=0.8, presence_penalty=0.5,
                   ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.0, min_tokens=10, logprobs=3),
])
def test_penalties_and_min_tokens_hold_at_every_draft_position(tiny_llm, params):
    """Each draft row is penalised (and held off EOS) by the output it would
    follow, its accepted drafts included: the same tokens as without
    speculation, with true drafts (all kept) and with repeats (some kept)."""
    engine = tiny_llm.llm_engine
    prompts = PROMPTS[:3]
    want = generate_all(engine, prompts, params)
    answers = {tuple(p): o.outputs[0].token_ids for p, o in zip(prompts, want)}
    for proposer in (_Scripted(answers, True), _Repeat()):
        with _speculating(engine, proposer) as stats:
            got = generate_all(engine, prompts, params)
        assert stats.num_draft_tokens > 0
        for g, w in zip(got, want):
            assert g.outputs[0].token_ids == w.outputs[0].token_ids
            if params.logprobs:
                for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                    assert a.keys() == b.keys()
                    for t in a:
                        assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
        if isinstance(proposer, _Scripted):
            assert stats.acceptance_rate == 1.0


def test_a_draft_of_eos_inside_min_tokens_is_never_kept(tiny_llm):
    engine = tiny_llm.llm_engine
    eos = next(iter(engine.eos_token_ids))
    params = SamplingParams(max_tokens=8, temperature=0.0, min_tokens=8)

    class _Eos:
        def propose(self, seq, max_drafts):
            return [eos] * min(2, max_drafts)

    (want,) = generate_all(engine, [PROMPTS[1]], params)
    with _speculating(engine, _Eos()) as stats:
        (got,) = generate_all(engine, [PROMPTS[1]], params)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert eos not in got.outputs[0].token_ids and len(got.outputs[0].token_ids) == 8
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == 0


def test_metrics_export_the_speculation_counters():
    from types import SimpleNamespace

    from pllm.core.spec_decode import SpecDecodeStats
    from pllm.entrypoints.openai.metrics import ServerMetrics

    metrics = ServerMetrics("m")
    spec = SpecDecodeStats(num_steps=5, num_proposals=8, num_draft_tokens=24,
                           num_accepted_tokens=18, num_emitted_tokens=26)
    metrics.on_stats(SimpleNamespace(num_running=1, num_waiting=0, kv_cache_usage=0.1,
                                     num_free_blocks=3, num_preemptions=0, prefix_cache_queries=0,
                                     prefix_cache_hits=0, spec_decode=spec))
    text = metrics.render().decode()
    assert 'pllm:spec_decode_num_draft_tokens{model_name="m"} 24.0' in text
    assert 'pllm:spec_decode_num_accepted_tokens{model_name="m"} 18.0' in text
    assert 'pllm:spec_decode_acceptance_rate{model_name="m"} 0.75' in text
    assert 'pllm:spec_decode_mean_accepted_length{model_name="m"} 3.25' in text



def test_static_shape_platforms_refuse_speculation_before_loading(tiny_model_dir, fake_platform):
    import dataclasses

    from pllm.core.engine import LLMEngine

    caps = dataclasses.replace(fake_platform().capabilities, token_buckets=(16, 32),
                               seq_buckets=(4,))
    static = type("Static", (fake_platform,), {"capabilities": property(lambda self: caps)})
    config = EngineArgs(model=tiny_model_dir,
                        speculative_config={"num_speculative_tokens": 2}).create_engine_config()
    with pytest.raises(ValueError, match="static shapes"):
        LLMEngine(config, platform=static())


def test_a_requests_first_token_is_never_speculated(tiny_llm):
    """With the prompt cached but its last token, the step that samples a
    request's first token (where n > 1 forks) is a one-token step: it must
    not carry drafts, or the forks would not be sampled."""
    engine = tiny_llm.llm_engine
    prompt = list(range(60, 60 + 33))  # two full 16-token blocks and one token
    params = SamplingParams(max_tokens=6, temperature=0.0, n=3, ignore_eos=True)
    with _speculating(engine, _Repeat()) as stats:
        generate_all(engine, [prompt], SamplingParams(max_tokens=1, temperature=0.0))
        (out,) = generate_all(engine, [prompt], params)
    assert out.num_cached_tokens == 32
    assert [len(s.token_ids) for s in out.outputs] == [6, 6, 6]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids
    assert stats.num_draft_tokens > 0


def test_sampled_tokens_through_the_engine_keep_their_distribution(tiny_llm):
    """Many seeded requests, each with one draft at its second token (the
    greedy continuation: often likely, sometimes not): the (first, second)
    token pairs with and without drafts are one distribution (chi-square
    test of homogeneity at 0.999)."""
    from collections import Counter

    engine = tiny_llm.llm_engine
    prompt = PROMPTS[1]
    (greedy,) = generate_all(engine, [prompt], SamplingParams(max_tokens=3, temperature=0.0,
                                                           ignore_eos=True))
    answers = {tuple(prompt): greedy.outputs[0].token_ids}
    num = 1500

    def pairs(seed0: int) -> Counter:
        params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=seed0 + i,
                                 ignore_eos=True) for i in range(num)]
        for i, p in enumerate(params):
            engine.add_request(f"s{i}", prompt, p)
        got = Counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[tuple(out.outputs[0].token_ids[:2])] += 1
        return got

    plain = pairs(0)
    with _speculating(engine, _Scripted(answers, True, k=1)) as stats:
        drafted = pairs(10**6)
    assert stats.num_draft_tokens == num and 0 < stats.num_accepted_tokens < num
    assert_one_distribution(plain, drafted, num)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
])
@pytest.mark.parametrize("q_logits", [
    [2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.4, -1.0],  # q = p (before filtering)
    [-1.0, 0.0, 2.5, 0.0, 1.0, -3.0, 0.5, 0.0],  # another ranking
    [0.0, -9.0, -9.0, -9.0, -9.0, -9.0, -9.0, 3.0],  # q on two tokens, one of them p's least likely
])
def test_drafts_drawn_from_q_emit_the_targets_own_distribution(params, q_logits):
    """A draft model's drafts: d ~ q, accepted with min(1, p(d)/q(d)), else
    a draw from max(0, p - q) normalised. Over many rows the emitted tokens
    are p itself; a residual of p with only the draft taken out, or an
    acceptance of p(d) alone, fails this."""
    torch.manual_seed(2)
    q = torch.tensor(q_logits).softmax(-1)
    drafts = torch.multinomial(q, VERIFY_ROWS, replacement=True)
    counts, want, accepted = _verified_counts(params, drafts, q)
    assert accepted.any()  # all of them where q is p
    assert _chi_square(counts, want.double()) < 24.3
