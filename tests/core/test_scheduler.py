"""The scheduler alone, without a model: what it schedules, and what it makes
of a step's result (fed by hand as the runner would return it)."""

from __future__ import annotations

import pytest

from pllm.core.config import SchedulerConfig
from pllm.core.detokenizer import Detokenizer
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.request import Request, SequenceStatus
from pllm.core.runner import RunnerOutput
from pllm.core.sampling_params import SamplingParams
from pllm.core.scheduler import Scheduler

EOS = 2
BLOCK = 4


class _Tokenizer:
    """Each id decodes to one letter: enough for the detokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def make_scheduler(num_blocks: int = 16, budget: int = 64, max_num_seqs: int = 8,
                   prefix_caching: bool = True, max_model_len: int = 64) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs),
                     kv, Detokenizer(_Tokenizer()), max_model_len)


def add(sched: Scheduler, rid: str, prompt: list[int], **params) -> Request:
    params.setdefault("max_tokens", 4)
    req = Request(rid, None, prompt, SamplingParams(**params), frozenset({EOS}))
    sched.add_request(req)
    return req


def run_step(sched: Scheduler, tokens: dict[str, int] | None = None, default: int = 7):
    """One step: schedule, then "sample" ``tokens[rid]`` (else ``default``)
    for every row that samples, as the runner would."""
    out = sched.schedule()
    out.shape = [(i.num_new_tokens, i.samples) for i in out.scheduled]  # before the update
    result = RunnerOutput()
    for item in out.scheduled:
        if item.samples:
            for seq in (item.seq, *item.forks):
                result.sampled.append(seq)
                result.token_ids.append((tokens or {}).get(seq.request.request_id, default))
                result.logprobs.append(None)
    return out, sched.update_from_output(out, result)


def test_long_prompts_are_prefilled_in_chunks_then_sample():
    sched = make_scheduler(budget=8)
    req = add(sched, "a", list(range(10, 30)))  # 20 tokens
    seq = req.seqs[0]
    sizes = []
    for _ in range(3):
        out, outputs = run_step(sched)
        sizes.append(out.shape)
    assert sizes == [[(8, False)], [(8, False)], [(4, True)]]
    assert seq.num_computed_tokens == 20 and seq.output_token_ids == [7]
    assert len(seq.block_ids) == 5  # the sampled token's slot comes with the next step
    assert outputs and outputs[0].outputs[0].token_ids == [7]


def test_decodes_go_first_and_the_budget_holds():
    sched = make_scheduler(budget=6)
    add(sched, "a", [10, 11, 12])
    run_step(sched)  # "a" prefills and samples
    add(sched, "b", list(range(20, 30)))
    out, _ = run_step(sched)
    assert [(i.seq.request.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 5)]
    assert out.num_tokens == 6


def test_the_newest_sequence_is_preempted_and_recomputed_later():
    sched = make_scheduler(num_blocks=4, budget=64)  # 16 slots
    a = add(sched, "a", list(range(10, 17)), max_tokens=20, ignore_eos=True).seqs[0]  # 7 tokens
    b = add(sched, "b", list(range(30, 37)), max_tokens=20, ignore_eos=True).seqs[0]
    run_step(sched)
    assert a.status is b.status is SequenceStatus.RUNNING and len(a.block_ids) == 2
    for _ in range(2):
        out, _ = run_step(sched)  # a reaches 9 tokens: needs a third block, none is free
    assert b.status is SequenceStatus.PREEMPTED and b.num_computed_tokens == 0 and not b.block_ids
    assert sched.waiting[0] is b and sched.num_preemptions == 1
    assert [i.seq for i in out.scheduled] == [a]
    assert b.token_ids[7:] == [7, 7]  # its tokens stay: recompute, not restart


def test_prefix_cache_hits_count_as_computed_when_admitted():
    sched = make_scheduler()
    prompt = list(range(40, 50))  # two full blocks and a partial one
    add(sched, "a", prompt)
    run_step(sched)
    b = add(sched, "b", prompt).seqs[0]
    out, _ = run_step(sched)
    item = next(i for i in out.scheduled if i.seq is b)
    assert item.num_new_tokens == 2 and b.request.num_cached_tokens == 8
    assert b.num_computed_tokens == 10  # 8 cached + 2 computed, written by the scheduler


def test_n_samples_fork_after_the_prompt_and_share_its_blocks():
    sched = make_scheduler()
    req = add(sched, "a", list(range(10, 16)), n=3, seed=5)
    out, outputs = run_step(sched)
    (item,) = out.scheduled
    assert [f.index for f in item.forks] == [1, 2] and [f.seed for f in item.forks] == [
        5 + 1_000_003, 5 + 2_000_006]
    assert len(req.seqs) == 3 and all(s.status is SequenceStatus.RUNNING for s in req.seqs)
    parent = req.seqs[0]
    first_block = parent.block_ids[0]
    assert all(s.block_ids[0] == first_block for s in req.seqs)
    assert sched.kv.pool.ref_counts[first_block] == 3
    assert [len(o.token_ids) for o in outputs[0].outputs] == [1, 1, 1]
    out, _ = run_step(sched)
    assert len(out.scheduled) == 3 and not any(i.forks for i in out.scheduled)


@pytest.mark.parametrize("token,max_tokens,status", [
    (EOS, 4, SequenceStatus.FINISHED_STOPPED),
    (9, 1, SequenceStatus.FINISHED_LENGTH),
])
def test_finished_requests_free_their_blocks(token, max_tokens, status):
    sched = make_scheduler()
    req = add(sched, "a", [10, 11, 12], max_tokens=max_tokens)
    free_before = sched.kv.pool.num_free_blocks
    _, outputs = run_step(sched, {"a": token})
    assert req.seqs[0].status is status and outputs[0].finished
    assert not sched.has_unfinished_requests() and not sched.running
    assert sched.kv.pool.num_free_blocks >= free_before


def test_abort_ends_the_request_and_frees_it():
    sched = make_scheduler()
    add(sched, "a", [10, 11, 12], max_tokens=10)
    add(sched, "b", [13, 14])
    run_step(sched)
    sched.finish_requests(["a", "unknown"], SequenceStatus.FINISHED_ABORTED)
    assert set(sched.requests) == {"b"}
    assert [s.request.request_id for s in sched.running] == ["b"]


def test_stop_strings_cut_the_text():
    sched = make_scheduler()
    req = add(sched, "a", [10, 11], stop=["c"], max_tokens=10)
    run_step(sched, {"a": 0})  # "a"
    run_step(sched, {"a": 1})  # "b"
    _, outputs = run_step(sched, {"a": 28})  # "c" (id 2 would be EOS): the stop string
    seq = req.seqs[0]
    assert seq.status is SequenceStatus.FINISHED_STOPPED and seq.stop_reason == "c"
    assert outputs[0].outputs[0].text == "ab"


def test_a_step_latency_target_sizes_prefill_chunks_while_requests_decode():
    from pllm.core.scheduler import StepBudget

    kv = KVCacheManager(64, BLOCK, True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8,
                                      target_step_latency_s=0.2),
                      kv, Detokenizer(_Tokenizer()), 256)
    add(sched, "long1", list(range(10, 110)), max_tokens=50)  # 100 tokens
    out, _ = run_step(sched)
    assert out.num_tokens == 64  # nobody decodes yet: the whole budget
    sched.observe_step(out, 0.01 * out.num_tokens)  # 10 ms a token: 0.2 s fits 20
    assert sched.step_budget.tokens == 20  # learnt at once, before anyone decodes
    run_step(sched)  # long1 finishes its prompt (no decodes yet: all of it) ...
    add(sched, "long2", list(range(200, 320)))
    for _ in range(6):  # ... and decodes from now on, first in every step
        out, _ = run_step(sched)
        assert out.scheduled[0].seq.request.request_id == "long1"
        assert out.num_tokens <= 20
        sched.observe_step(out, 0.01 * out.num_tokens)
    # A step costs 50 ms plus 1 ms a token: 50 tokens fit in 100 ms.
    budget = StepBudget(0.1, 512, min_tokens=4)
    budget.observe(200, 0.25)  # no fit yet: through the origin, on the short side
    assert budget.tokens == 80
    for _ in range(10):
        budget.observe(4, 0.054)  # decode steps: almost all fixed cost
    assert budget.tokens == 50  # not 4 * 0.1 / 0.054 = 7
    for _ in range(200):
        budget.observe(4, 0.054)  # a window of decode steps only keeps the last fit
    assert budget.tokens == 50
    budget.observe(60, 3.0)  # far too slow: shrink at once, never below the floor
    assert budget.tokens == 4


@pytest.mark.parametrize("fixed, per_token, want", [
    # 30 ms + 0.8 ms a token: the decodes and a 256-token prompt chunk while
    # at most 8 streams decode (257 and 264 tokens); beyond, the chunk is
    # 2048 / n tokens, at least 64 (16 streams: 16 + 128). The pace, 2x a
    # decode step of the same streams, binds once it is more (32 streams:
    # 2 * (30 + 0.8 * 32) ms = 111.2 ms, 101.5 tokens against the floor's
    # 32 + 64; 100: 237.5; 200: 437.5); the 800 ms target (962 tokens)
    # binds only with hundreds of streams.
    (0.030, 0.0008, {1: 257, 8: 264, 16: 144, 32: 101, 100: 237, 200: 437, 400: 837,
                     600: 962}),
    # 50 ms + 4 ms a token: the target (187 tokens) binds before the floor,
    # and the pace with 64 streams (2 * (50 + 4 * 64) ms: 140.5 tokens).
    (0.050, 0.004, {1: 187, 8: 187, 64: 140}),
    # 10 ms + 0.02 ms a token: 2x a decode step is past the floor at once
    # (502.5 and 520.5 tokens); --max-num-batched-tokens (2048) still bounds it.
    (0.01001, 0.00002, {1: 502, 10: 520, 1000: 2048}),
    # Steps slower than the target: the floor gives way to it.
    (2.0, 0.05, {1: 16, 64: 16}),
])
def test_the_step_budget_keeps_pace_with_the_decoding_streams(fixed, per_token, want):
    from pllm.core.scheduler import StepBudget

    budget = StepBudget(0.8, 2048)
    assert budget.tokens_for(1) == 2048  # nothing measured yet
    for n in (10, 200) * 8:
        budget.observe(n, fixed + per_token * n)
    assert budget.fixed_s == pytest.approx(fixed) and budget.per_token_s == pytest.approx(per_token)
    assert {n: budget.tokens_for(n) for n in want} == want


def _sampled(out) -> RunnerOutput:
    result = RunnerOutput()
    for item in out.scheduled:
        if item.samples:
            result.sampled.append(item.seq)
            result.token_ids.append(7)
            result.logprobs.append(None)
    return result


def test_pipelined_batches_split_the_running_requests_and_never_share_one():
    """Two batches in flight (two pipeline stages): each takes its half of
    the running sequences; a request in flight is not scheduled again until
    its batch is applied."""
    sched = make_scheduler(num_blocks=16)
    sched.pipeline_depth = 2
    for rid in "abcd":
        add(sched, rid, [10, 11, 12, 13], max_tokens=8)
    first = sched.schedule()
    assert len(first.scheduled) == 4  # admissions are not split
    sched.update_from_output(first, _sampled(first))  # four decoding sequences
    a = sched.schedule()
    assert [i.seq.request.request_id for i in a.scheduled] == ["a", "b"]
    sched.in_flight |= {"a", "b"}
    b = sched.schedule()
    assert [i.seq.request.request_id for i in b.scheduled] == ["c", "d"]
    sched.in_flight |= {"c", "d"}
    assert sched.schedule().is_empty
    sched.update_from_output(a, _sampled(a))
    sched.in_flight -= {"a", "b"}
    assert [i.seq.request.request_id for i in sched.schedule().scheduled] == ["a", "b"]


def test_a_request_in_flight_is_never_preempted():
    """b needs a block, the only one to take is a's, and a's batch is in
    flight (later stages still write its blocks): b gives up its own place."""
    sched = make_scheduler(num_blocks=3)
    sched.pipeline_depth = 2
    for rid in "ab":
        add(sched, rid, [10, 11, 12, 13], max_tokens=8)  # a block each; one left
    first = sched.schedule()
    sched.update_from_output(first, _sampled(first))
    a = sched.schedule()  # a takes the free block for its fifth token
    assert [i.seq.request.request_id for i in a.scheduled] == ["a"]
    sched.in_flight |= {"a"}
    b = sched.schedule()
    assert b.is_empty and [s.request.request_id for s in b.preempted] == ["b"]
    seq_a = sched.requests["a"].seqs[0]
    assert seq_a.status is SequenceStatus.RUNNING and len(seq_a.block_ids) == 2
