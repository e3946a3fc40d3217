"""Structured outputs (``pllm.core.structured``): the bitmask pllm unpacks
and applies on the device against xgrammar's own kernel along random token
streams; a tiny random model held to a choice, a regex and JSON schemas,
greedy and sampled, with n > 1, chunked prefill, prefix hits and
preemption; a grammar that compiles slowly holds back its request only; a
grammar that does not parse is refused by name. On the fake platform."""

from __future__ import annotations

import json
import random
import re
import threading

import pytest
import torch
from engine_utils import generate_all

xgr = pytest.importorskip("xgrammar")

from pllm import LLM, SamplingParams  # noqa: E402
from pllm.core.sampling_params import SamplingParamsError, StructuredOutputsParams  # noqa: E402
from pllm.core.structured import GrammarCache, allowed_mask  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "kind", "count", "tags"],
    "additionalProperties": False,
}
CASES = {
    "choice": (StructuredOutputsParams(choice=["yes", "no", "not sure"]),
               lambda text: text in ("yes", "no", "not sure")),
    "regex": (StructuredOutputsParams(regex=r"[a-c]{3}-[0-9]{2}"),
              lambda text: re.fullmatch(r"[a-c]{3}-[0-9]{2}", text) is not None),
    "json": (StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
             lambda text: _valid(json.loads(text))),
    # Bounded: a random model would go on repeating an unbounded rule.
    "grammar": (StructuredOutputsParams(grammar='root ::= "(" num ("+" num)? ")"\n'
                                                'num ::= [0-9] [0-9]?'),
                lambda text: re.fullmatch(r"\(\d\d?(\+\d\d?)?\)", text) is not None),
}


def _valid(obj) -> bool:
    return (set(obj) == {"ok", "kind", "count", "tags"} and isinstance(obj["ok"], bool)
            and obj["kind"] in ("cat", "dog", "bird") and 0 <= obj["count"] <= 99
            and len(obj["tags"]) <= 3 and all(t in ("a", "b") for t in obj["tags"]))


@pytest.mark.parametrize("params", [CASES["json"][0], CASES["regex"][0], CASES["grammar"][0]])
def test_the_device_mask_is_xgrammars_along_random_token_streams(tiny_llm, params):
    """Random streams of allowed tokens: at every position the tokens pllm's
    unpacked bitmask leaves are those xgrammar's own kernel leaves."""
    engine = tiny_llm.llm_engine
    cache = GrammarCache(engine.tokenizer, engine.loaded.hf_config.vocab_size,
                         engine.eos_token_ids)
    compiled = cache.get(params).result(timeout=60)
    vocab = engine.loaded.hf_config.vocab_size
    rng = random.Random(0)
    try:
        for _ in range(6):
            matcher = cache.matcher(compiled)
            for _ in range(40):
                if matcher.is_terminated():
                    break
                ours = allowed_mask([matcher], vocab, torch.device("cpu"))[0]
                logits = torch.zeros(1, vocab)
                bitmask = xgr.allocate_token_bitmask(1, vocab)
                matcher.fill_next_token_bitmask(bitmask, 0)
                xgr.apply_token_bitmask_inplace(logits, bitmask)
                assert torch.equal(ours, logits[0] == 0)
                assert ours.any()
                assert matcher.accept_token(rng.choice(ours.nonzero().flatten().tolist()))
    finally:
        cache.shutdown()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_outputs_hold_to_their_grammar_and_finish_with_stop(tiny_llm, case, temperature):
    structured, valid = CASES[case]
    params = SamplingParams(max_tokens=80, temperature=temperature, seed=1, n=2,
                            structured_outputs=structured)
    outs = generate_all(tiny_llm.llm_engine, ["hello there", [5, 6, 7], "The capital"], params)
    for out in outs:
        assert len(out.outputs) == 2
        for sample in out.outputs:
            assert sample.finish_reason == "stop", sample
            assert valid(sample.text), sample.text


def test_structured_requests_under_chunks_prefix_hits_and_preemption(tiny_model_dir, fake_platform):
    llm = LLM(tiny_model_dir, device="fakeaccel", kv_cache_memory="80KB", block_size=8,
              max_model_len=128, max_num_batched_tokens=32)
    try:
        engine = llm.llm_engine
        prompts = [list(range(40, 75)), [9] * 20, [12, 13, 14], list(range(40, 75))] * 2
        params = SamplingParams(max_tokens=90, temperature=0.8, seed=3,
                                structured_outputs=CASES["json"][0])
        outs = generate_all(engine, prompts, params)
        for out in outs:
            assert out.outputs[0].finish_reason == "stop"
            assert _valid(json.loads(out.outputs[0].text))
        stats = engine.get_stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        llm.shutdown()


def test_a_grammar_still_compiling_holds_back_its_request_only(tiny_llm, monkeypatch):
    engine = tiny_llm.llm_engine
    engine._grammars()
    release = threading.Event()
    compile_ = GrammarCache._compile

    def slow(self, *args):
        release.wait(timeout=60)
        return compile_(self, *args)

    monkeypatch.setattr(GrammarCache, "_compile", slow)
    structured = StructuredOutputsParams(regex=r"slow-[0-9]")  # not compiled before
    engine.add_request("held", "hi", SamplingParams(max_tokens=8, structured_outputs=structured))
    engine.add_request("free", "hi", SamplingParams(max_tokens=4, temperature=0.0,
                                                    ignore_eos=True))
    finished = {}
    for _ in range(20):
        finished.update({o.request_id: o for o in engine.step() if o.finished})
        if "free" in finished:
            break
    assert "free" in finished and "held" not in finished
    release.set()
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert re.fullmatch(r"slow-[0-9]", finished["held"].outputs[0].text)


@pytest.mark.parametrize("value, message", [
    ({"json": '{"type": "object", "properties": 5}'}, "invalid json"),
    ({"regex": "[a-"}, "invalid regex"),
    ({"grammar": "root ::= missing_rule"}, "invalid grammar"),
    ({"choice": []}, "list of non-empty strings"),
    ({"regex": "a", "choice": ["b"]}, "exactly one of"),
    ({"colour": "red"}, "unexpected keyword"),
])
def test_a_bad_grammar_is_refused_by_name(tiny_llm, value, message):
    with pytest.raises(SamplingParamsError, match=message) as info:
        tiny_llm.llm_engine.add_request("bad", "hi", SamplingParams(structured_outputs=value))
    assert info.value.param == "structured_outputs"
    assert not tiny_llm.llm_engine.has_unfinished_requests()


def test_logit_bias_bans_and_forces_tokens(tiny_llm):
    engine = tiny_llm.llm_engine
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    (plain,) = generate_all(engine, [[5, 6, 7]], greedy)
    first = plain.outputs[0].token_ids[0]
    banned = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                            logit_bias={first: -100.0})
    (out,) = generate_all(engine, [[5, 6, 7]], banned)
    assert first not in out.outputs[0].token_ids
    forced = SamplingParams(max_tokens=6, temperature=1.0, seed=0, ignore_eos=True,
                            logit_bias={77: 100.0}, logprobs=1)
    (out,) = generate_all(engine, [[5, 6, 7]], forced)
    assert out.outputs[0].token_ids == [77] * 6
    for bad, message in [({-1: 1.0}, "not a token id"), ({3: 101.0}, r"in \[-100, 100\]"),
                         ({320: 1.0}, "not a token id of this model")]:
        with pytest.raises(SamplingParamsError, match=message):
            engine.add_request("bad", [1, 2], SamplingParams(logit_bias=bad))


def test_choices_beyond_the_basic_plane_and_min_tokens_past_the_grammars_end(tiny_llm):
    """An emoji choice is matched as its UTF-8 bytes (not as two surrogate
    code points); min_tokens longer than the grammar yields to the grammar's
    end instead of banning its only allowed token."""
    engine = tiny_llm.llm_engine
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=2, n=4,
                            structured_outputs={"choice": ["\U0001F600 ok", "fine"]})
    (out,) = generate_all(engine, ["how are you?"], params)
    assert {s.text for s in out.outputs} <= {"\U0001F600 ok", "fine"}
    assert all(s.finish_reason == "stop" for s in out.outputs)
    params = SamplingParams(max_tokens=20, temperature=0.0, min_tokens=10,
                            structured_outputs={"choice": ["yes"]})
    (out,) = generate_all(engine, ["ok?"], params)
    assert (out.outputs[0].text, out.outputs[0].finish_reason) == ("yes", "stop")
