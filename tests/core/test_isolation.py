"""One bad request must not end the others: values that used to pass
validation and then break a step are refused when the request is added, and
what still fails inside a step (sampling, detokenizing, forking, stop checks,
a forward pass that admitted it) ends that request alone."""

from __future__ import annotations

import pytest

from pllm import SamplingParams
from pllm.core.request import Sequence
from pllm.core.sampler import SamplingMetadata
from pllm.core.sampling_params import SamplingParamsError

BYSTANDER = [11, 12, 13, 14, 15]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]],
         late: dict[str, tuple[list[int], SamplingParams]] | None = None):
    """Add ``requests``, step once, add ``late`` (so they are admitted while the
    first ones run), and step to the end. Returns the final outputs by id."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    finals = {}
    first = True
    while engine.has_unfinished_requests() or first:
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if first and late:
            for rid, (prompt, params) in late.items():
                engine.add_request(rid, prompt, params)
        first = False
    return finals


@pytest.fixture
def engine(tiny_llm):
    engine = tiny_llm.llm_engine
    assert not engine.has_unfinished_requests()
    free = engine.kv.pool.num_free_blocks
    yield engine
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_free_blocks == free  # nothing leaked, whatever failed


@pytest.fixture
def expected(tiny_llm):
    return _run(tiny_llm.llm_engine, {"b": (BYSTANDER, GREEDY)})["b"].outputs[0].token_ids


# ---------------------------------------------------------------- refused at the boundary


@pytest.mark.parametrize("kwargs, param", [
    ({"top_k": 10**23}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"n": 1.5}, "n"),
])
def test_values_outside_what_a_step_can_hold_are_refused_naming_the_field(kwargs, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_top_k_message_says_zero_disables():
    with pytest.raises(SamplingParamsError, match=r"-1 or 0 \(disabled\)"):
        SamplingParams(top_k=-2)


def test_token_ids_outside_the_vocabulary_are_refused_at_add_request(engine):
    vocab = engine.loaded.hf_config.vocab_size
    bad = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[vocab + 5])
    with pytest.raises(SamplingParamsError) as info:
        engine.add_request("bad", [1, 2, 3], bad)
    assert info.value.param == "stop_token_ids"
    with pytest.raises(SamplingParamsError) as info:
        engine.add_request("bad", [1, 2, 3], SamplingParams(logprobs=vocab + 1))
    assert info.value.param == "logprobs"
    assert not engine.has_unfinished_requests()


def test_a_huge_top_k_and_the_largest_seed_with_n_2_run(engine, expected):
    """top_k beyond the vocabulary means the whole vocabulary; a seed at the
    top of uint64 forks into siblings whose seeds wrap, reproducibly."""
    params = SamplingParams(n=2, seed=2**64 - 1, top_k=10**12, max_tokens=6, ignore_eos=True)
    runs = [_run(engine, {"b": (BYSTANDER, GREEDY), "s": ([3, 4, 5], params)}) for _ in range(2)]
    for finals in runs:
        assert finals["b"].outputs[0].token_ids == expected
        assert [len(c.token_ids) for c in finals["s"].outputs] == [6, 6]
    assert ([c.token_ids for c in runs[0]["s"].outputs]
            == [c.token_ids for c in runs[1]["s"].outputs])


# ---------------------------------------------------------------- isolated inside a step


def _is_bad(seq: Sequence) -> bool:
    return seq.request.request_id == "bad"


def _break_sampling(monkeypatch, engine):
    build = SamplingMetadata.build.__func__

    def failing(cls, seqs, *args, **kwargs):
        if any(_is_bad(s) for s in seqs):
            raise OverflowError("sampling blew up")
        return build(cls, seqs, *args, **kwargs)

    monkeypatch.setattr(SamplingMetadata, "build", classmethod(failing))
    return "sampling failed: OverflowError: sampling blew up"


def _break_detokenizing(monkeypatch, engine):
    step = engine.detokenizer.step

    def failing(seq):
        if _is_bad(seq):
            raise IndexError("detokenizer blew up")
        return step(seq)

    monkeypatch.setattr(engine.detokenizer, "step", failing)
    return "handling its sampled token failed: IndexError: detokenizer blew up"


def _break_forking(monkeypatch, engine):
    fork = Sequence.fork

    def failing(self, index):
        if _is_bad(self):
            raise OverflowError("fork blew up")
        return fork(self, index)

    monkeypatch.setattr(Sequence, "fork", failing)
    return "forking its samples failed: OverflowError: fork blew up"


def _break_the_forward_pass(monkeypatch, engine):
    execute = engine.executor.execute

    def failing(sched):
        if any(_is_bad(item.seq) for item in sched.scheduled):
            raise RuntimeError("forward blew up")
        return execute(sched)

    monkeypatch.setattr(engine.executor, "execute", failing)
    return "the step that admitted it failed: RuntimeError: forward blew up"


@pytest.mark.parametrize("breaker", [_break_sampling, _break_detokenizing, _break_forking,
                                     _break_the_forward_pass])
def test_a_request_that_fails_inside_a_step_ends_alone(engine, expected, monkeypatch, breaker):
    message = breaker(monkeypatch, engine)
    bad = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=8, ignore_eos=True)
    other = SamplingParams(max_tokens=5, temperature=0.7, seed=1, ignore_eos=True)
    finals = _run(engine, {"b": (BYSTANDER, GREEDY)},
                  late={"bad": ([7, 8, 9], bad), "o": ([4, 5, 6, 7], other)})
    assert finals["b"].outputs[0].token_ids == expected and finals["b"].error is None
    assert len(finals["o"].outputs[0].token_ids) == 5 and finals["o"].error is None
    assert finals["bad"].error == message
    assert all(c.finish_reason == "abort" for c in finals["bad"].outputs)


def test_a_step_that_fails_without_admitting_anything_is_raised(engine, monkeypatch):
    engine.add_request("b", BYSTANDER, GREEDY)
    engine.step()  # "b" runs now
    calls = []

    def failing(sched):
        calls.append(len(sched.scheduled))
        raise RuntimeError("the device is on fire")

    monkeypatch.setattr(engine.executor, "execute", failing)
    engine.add_request("x", [1, 2, 3], GREEDY)
    with pytest.raises(RuntimeError, match="on fire"):  # the retry without "x" failed too
        engine.step()
    assert calls == [2, 1]
    (failed,) = engine.scheduler.take_failed()
    assert failed.request_id == "x" and "on fire" in failed.error
    with pytest.raises(RuntimeError, match="on fire"):  # nothing admitted: raised at once
        engine.step()
    assert calls == [2, 1, 1]
    engine.abort_request("b")  # what the server does with a failed batch
