"""Beam search (``LLM.beam_search``, pllm.core.beam_search) on the fake
platform, against a plain beam search over transformers' logits with
vLLM's rules; the beams' blocks shared copy-on-write and all given back;
preemption, token-budget splits and prefix hits changing nothing; on the
scheduler alone, beams that wait for a sibling giving up their blocks, a
full context and all-EOS proposals ending the search; what beam search
refuses, and failures kept to their request."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pllm import LLM, BeamSearchParams, SamplingParams
from pllm.core import beam_search
from pllm.core.config import SchedulerConfig
from pllm.core.detokenizer import Detokenizer
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.outputs import Logprob
from pllm.core.request import Request
from pllm.core.runner import RunnerOutput
from pllm.core.sampling_params import SamplingParamsError, StructuredOutputsParams
from pllm.core.scheduler import Scheduler
from pllm.testing.e2e import tiny_prompts

PROMPTS = tiny_prompts(lens=(3, 9, 17, 6), seed=1)  # block size 8: beams cross block edges
MAX_TOKENS = 10


def _llm(model_dir, **args) -> LLM:
    args = {"kv_cache_memory": "4MB", "max_model_len": 128, "block_size": 8, "dtype": "float32",
            **args}
    return LLM(model_dir, device="fakeaccel", **args)


@pytest.fixture(scope="module")
def llm(tiny_model_dir, fake_platform):
    llm = _llm(tiny_model_dir)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from pllm.loader.transformers_compat import dtype_kwargs

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir,
                                                **dtype_kwargs(torch.float32)).eval()


@pytest.fixture
def eos(llm, hf, monkeypatch) -> frozenset[int]:
    """An EOS the tiny model proposes: its real one it never ranks high
    enough here, so the second most likely first token of PROMPTS[1]
    stands in (for the engine and the reference alike)."""
    with torch.inference_mode():
        logits = hf(torch.tensor([PROMPTS[1]])).logits[0, -1]
    eos = frozenset({logits.topk(2).indices[1].item()})
    monkeypatch.setattr(llm.llm_engine, "eos_token_ids", eos)
    return eos


def reference(hf, prompt: list[int], params: BeamSearchParams, eos: frozenset[int]):
    """vLLM's beam search written out plainly over transformers' logits,
    every step recomputing each beam's whole sequence (the beams of a step,
    of one length, in one batch): (tokens, cum_logprob, finish_reason) of
    the best beam_width hypotheses, best first."""
    def score(hypothesis):
        tokens, cum, _ = hypothesis
        return cum / (len(tokens) - (tokens[-1] in eos)) ** params.length_penalty

    beams, completed = [(list(prompt), 0.0, "length")], []
    for _ in range(params.max_tokens):
        going = []
        with torch.inference_mode():
            logits = hf(torch.tensor([tokens for tokens, _, _ in beams])).logits[:, -1].float()
        values, ids = logits.log_softmax(-1).topk(2 * params.beam_width)
        for (tokens, cum, _), row_values, row_ids in zip(beams, values.tolist(), ids.tolist()):
            for value, token in zip(row_values, row_ids):
                if token in eos and not params.ignore_eos:
                    completed.append((tokens + [token], cum + value, "stop"))
                else:
                    going.append((tokens + [token], cum + value, "length"))
        beams = sorted(going, key=score, reverse=True)[:params.beam_width]
    return sorted(completed + beams, key=score, reverse=True)[:params.beam_width]


def assert_same(outs, expected) -> None:
    for i, (out, want) in enumerate(zip(outs, expected, strict=True)):
        got = [(s.tokens, s.cum_logprob, s.finish_reason) for s in out.sequences]
        assert [g[0] for g in got] == [w[0] for w in want], f"prompt {i}"
        assert [g[2] for g in got] == [w[2] for w in want], f"prompt {i}"
        for (_, cum, _), (_, ref, _) in zip(got, want):
            assert cum == pytest.approx(ref, abs=1e-4), f"prompt {i}"


CASES = [  # beam_width, ignore_eos, length_penalty
    (1, True, 1.0), (1, False, 1.0), (3, False, 1.0), (3, True, 0.5), (4, False, 1.0),
]


@pytest.mark.parametrize("width,ignore_eos,length_penalty", CASES)
def test_beam_search_equals_a_plain_one_over_transformers(llm, hf, eos, width, ignore_eos,
                                                          length_penalty):
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, ignore_eos=ignore_eos,
                              length_penalty=length_penalty)
    expected = [reference(hf, p, params, eos) for p in PROMPTS]
    outs = llm.beam_search(PROMPTS, params)
    assert_same(outs, expected)
    engine = llm.llm_engine
    assert engine.kv.pool.num_free_blocks == engine.kv.num_total_blocks
    tokenizer = llm.get_tokenizer()
    for out, prompt in zip(outs, PROMPTS):
        assert len(out.sequences) == width
        for seq in out.sequences:
            assert seq.tokens[:len(prompt)] == prompt and seq.text == tokenizer.decode(seq.tokens)
            generated = seq.tokens[len(prompt):]
            assert len(seq.logprobs) == len(generated)
            assert all(t in entry for t, entry in zip(generated, seq.logprobs))
            assert seq.cum_logprob == pytest.approx(
                sum(entry[t].logprob for t, entry in zip(generated, seq.logprobs)))
    ended = [s for out in outs for s in out.sequences if s.finish_reason == "stop"]
    if ignore_eos:  # EOS was proposed on the way, and nothing ended there
        assert not ended
        assert any(eos & entry.keys() for out in outs for s in out.sequences
                   for entry in s.logprobs)
    else:
        assert ended and all(s.tokens[-1] in eos for s in ended)
        assert any(s.finish_reason == "length" for out in outs for s in out.sequences)


def test_one_beam_is_greedy_decoding(llm):
    """With EOS ignored and never the argmax here. (Where it is, vLLM's score
    counts the length one short for a beam ending in EOS, which ranks it
    below the next token: the stand-in EOS of the test above does that to
    PROMPTS[2], and the reference agrees.)"""
    params = BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    beams = llm.beam_search(PROMPTS, params)
    plain = llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert [o.sequences[0].tokens[len(p):] for o, p in zip(beams, PROMPTS)] == \
        [g.outputs[0].token_ids for g in plain]


def test_prompts_in_every_form_of_generate(llm):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("The capital of France")
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    forms = llm.beam_search(["The capital of France", {"prompt": "The capital of France"},
                             {"prompt_token_ids": ids}, ids], params)
    assert len({tuple(tuple(s.tokens) for s in o.sequences) for o in forms}) == 1
    assert forms[0].sequences[0].tokens[:len(ids)] == ids


def test_temperature_adds_the_sampled_token_to_the_proposals(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=4, temperature=1.0)
    (out,) = llm.beam_search([PROMPTS[1]], params)
    entries = [entry for seq in out.sequences for entry in seq.logprobs]
    assert all(4 <= len(entry) <= 5 for entry in entries)
    # The tiny model's next token is all but uniform: a draw lands in its
    # top 4 about one time in fifty.
    assert any(len(entry) == 5 for entry in entries)


def test_beams_share_the_prompts_blocks_and_copy_on_write(llm, hf):
    """After the first selection the four beams hold the prompt's blocks
    (one full, one partial) once; each beam's first write into the partial
    block copies it, the full one stays shared; at the end every block is
    back in the pool."""
    engine = llm.llm_engine
    pool = engine.kv.pool
    prompt = PROMPTS[2][:13]
    params = BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True)
    copies: list[list[tuple[int, int]]] = []
    tables: list[list[list[int]]] = []  # the scheduled beams' blocks as each step runs
    execute = engine.executor.execute

    def recording(sched):
        copies.append(list(sched.block_copies))
        tables.append([list(item.seq.block_ids) for item in sched.scheduled])
        return execute(sched)

    engine.executor.execute = recording
    try:
        engine.add_request("cow", prompt, params.to_sampling_params())
        req = engine.scheduler.requests["cow"]
        engine.step()  # the prompt: one sequence proposes, four beams go on
        beams = list(req.seqs)
        assert len(beams) == 4 and all(len(b.block_ids) == 2 for b in beams)
        assert len({tuple(b.block_ids) for b in beams}) == 1
        assert [pool.ref_counts[b] for b in beams[0].block_ids] == [4, 4]
        assert pool.num_blocks - pool.num_free_blocks == 2
        full, partial = beams[0].block_ids
        engine.step()  # each beam writes token 13, in the shared partial block
        assert len(copies[-1]) == 3  # the last writer keeps the block
        assert {src for src, _ in copies[-1]} == {partial}
        assert {dst for _, dst in copies[-1]} < {t[1] for t in tables[-1]}
        assert len(tables[-1]) == 4 and {t[0] for t in tables[-1]} == {full}
        assert len({t[1] for t in tables[-1]}) == 4  # one partial block each now
        assert all(b.block_ids[0] == full for b in req.seqs)
        assert pool.ref_counts[full] == len(req.seqs) > 1
        done = []
        while engine.has_unfinished_requests():
            done += [o for o in engine.step() if o.finished]
    finally:
        engine.executor.execute = execute
    (out,) = done
    want = reference(hf, prompt, params, engine.eos_token_ids)
    assert [prompt + c.token_ids for c in out.outputs] == [w[0] for w in want]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert pool.num_free_blocks == pool.num_blocks
    assert all(count == 0 for count in pool.ref_counts)


def test_preemption_token_budget_splits_and_prefix_hits_change_nothing(tiny_model_dir, hf):
    """Twelve blocks for two prompts of four beams each: beams are preempted
    (some while they wait for their siblings) and recomputed; a budget of 6
    tokens splits both prompts and the beams of a step; the second round
    hits the prefix cache."""
    llm = _llm(tiny_model_dir, num_blocks_override=12, max_model_len=64,
               max_num_batched_tokens=6)
    try:
        engine = llm.llm_engine
        params = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS)
        prompts = [PROMPTS[2], PROMPTS[1]]
        expected = [reference(hf, p, params, engine.eos_token_ids) for p in prompts]
        for _ in range(2):
            assert_same(llm.beam_search(prompts, params), expected)
        stats = engine.get_stats()
        assert stats.num_preemptions > 0, "the cache was meant to be too small for all beams"
        assert stats.prefix_cache_hits > 0
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.shutdown()


class _Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _scheduler_run(num_blocks: int, max_model_len: int, params: BeamSearchParams,
                   eos: frozenset[int] = frozenset({2})):
    """One beam search on the scheduler alone (blocks of 4 tokens), every
    beam proposing 20, 21, 22, 23 at -1, -1.5, -2, -2.5 as the runner would;
    its final output and the scheduler."""
    kv = KVCacheManager(num_blocks, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), kv,
                      Detokenizer(_Letters()), max_model_len)
    sched.add_request(Request("r", None, [10, 11, 12, 13], params.to_sampling_params(), eos))
    done = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        assert out.scheduled, "nothing can run: the beams deadlocked"
        result = RunnerOutput()
        for item in out.scheduled:
            if item.samples:
                result.sampled.append(item.seq)
                result.token_ids.append(20)
                result.logprobs.append({t: Logprob(-1.0 - (t - 20) / 2, t - 19)
                                        for t in (20, 21, 22, 23)})
        done += [o for o in sched.update_from_output(out, result) if o.finished]
    assert kv.pool.num_free_blocks == num_blocks
    (out,) = done
    return out, sched


def test_a_beam_waiting_for_its_sibling_gives_up_its_blocks():
    """Two blocks, two beams: A, done with its step, holds both while its
    sibling B, preempted, needs one. No step would ever free them; A is
    preempted too (keeping its proposals), B runs, the beams go on."""
    params = BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True)
    out, sched = _scheduler_run(2, 64, params)
    assert [(c.token_ids, c.cumulative_logprob) for c in out.outputs] == \
        [([20, 20, 20], -3.0), ([20, 20, 21], -3.5)]
    assert sched.num_preemptions >= 2


def test_a_full_context_ends_the_beams():
    out, _ = _scheduler_run(8, 7, BeamSearchParams(beam_width=2, max_tokens=10))
    assert [(c.token_ids, c.finish_reason) for c in out.outputs] == \
        [([20, 20, 20], "length"), ([20, 20, 21], "length")]


def test_when_every_proposal_is_eos_the_ended_hypotheses_are_the_result():
    out, _ = _scheduler_run(8, 64, BeamSearchParams(beam_width=2, max_tokens=10),
                            eos=frozenset({20, 21, 22, 23}))
    assert [(c.token_ids, c.cumulative_logprob, c.finish_reason) for c in out.outputs] == \
        [([20], -1.0, "stop"), ([21], -1.5, "stop")]


def test_abort_frees_every_beam(llm):
    engine = llm.llm_engine
    engine.add_request("gone", PROMPTS[2], BeamSearchParams(4, 20).to_sampling_params())
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.requests["gone"].seqs) == 4
    assert engine.kv.pool.num_free_blocks < engine.kv.num_total_blocks
    engine.abort_request("gone")
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free_blocks == engine.kv.num_total_blocks


def test_a_failing_selection_ends_its_request_alone(llm, monkeypatch):
    select = beam_search.select

    def failing(beams, params, eos):
        if beams[0].request.request_id == "bad" and beams[0].num_output_tokens == 2:
            raise RuntimeError("boom")
        return select(beams, params, eos)

    monkeypatch.setattr(beam_search, "select", failing)
    engine = llm.llm_engine
    params = BeamSearchParams(3, 5, ignore_eos=True).to_sampling_params()
    engine.add_request("bad", PROMPTS[0], params)
    engine.add_request("good", PROMPTS[1], params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert "boom" in done["bad"].error
    assert {c.finish_reason for c in done["bad"].outputs} == {"abort"}
    assert done["good"].error is None and len(done["good"].outputs) == 3
    assert all(len(c.token_ids) == 5 for c in done["good"].outputs)
    assert engine.kv.pool.num_free_blocks == engine.kv.num_total_blocks


def test_what_beam_search_refuses(llm, tiny_model_dir):
    beam = BeamSearchParams(beam_width=2, max_tokens=4)
    params = beam.to_sampling_params()
    refused = {
        "n": dict(n=2),
        "structured_outputs": dict(structured_outputs=StructuredOutputsParams(regex="a+")),
        "stop": dict(stop=["x"]),
        "beam_search": dict(repetition_penalty=1.2),
    }
    for param, change in refused.items():
        with pytest.raises(SamplingParamsError) as err:
            dataclasses.replace(params, **change)
        assert err.value.param == param
    with pytest.raises(SamplingParamsError, match="to_sampling_params"):
        dataclasses.replace(params, logprobs=1)  # not the 2 * beam_width proposals
    for bad in (dict(beam_width=0, max_tokens=4), dict(beam_width=2, max_tokens=0),
                dict(beam_width=2, max_tokens=4, temperature=-1.0)):
        with pytest.raises(SamplingParamsError):
            BeamSearchParams(**bad)
    with pytest.raises(SamplingParamsError, match="beam_width"):  # 2 * 200 > the vocabulary
        llm.beam_search([[5, 6]], BeamSearchParams(beam_width=200, max_tokens=2))
    spec = _llm(tiny_model_dir, speculative_config={"method": "ngram",
                                                    "num_speculative_tokens": 2})
    try:
        with pytest.raises(SamplingParamsError, match="speculative decoding"):
            spec.beam_search([[5, 6]], beam)
        assert not spec.llm_engine.has_unfinished_requests()
    finally:
        spec.shutdown()
