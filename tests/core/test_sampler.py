"""Sampling through the engine: seeds, n, logprobs, stops, penalties, limits."""

from __future__ import annotations

import pytest
import torch

from pllm import SamplingParams
from pllm.core.request import Request, Sequence
from pllm.core.sampler import SamplingMetadata, sample

PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 3]]


def run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def assert_no_leak(llm):
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not llm.llm_engine.has_unfinished_requests()


def test_seeded_sampling_is_independent_of_the_batch(tiny_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = run(tiny_llm, [PROMPTS[0]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=5), seeded]
    mixed = run(tiny_llm, [PROMPTS[1], PROMPTS[2], PROMPTS[0]], others)
    assert mixed[2].outputs[0].token_ids == alone
    again = run(tiny_llm, [PROMPTS[0], PROMPTS[0]], [SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                max_tokens=20, ignore_eos=True), seeded])
    assert again[1].outputs[0].token_ids == alone
    assert again[0].outputs[0].token_ids != alone  # another seed, other tokens
    assert_no_leak(tiny_llm)


def test_n_samples_share_the_prompt_and_differ(tiny_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = run(tiny_llm, [PROMPTS[2]], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert run(tiny_llm, [PROMPTS[2]], params)[0].outputs[1].token_ids == out.outputs[1].token_ids
    assert_no_leak(tiny_llm)


def test_greedy_equivalents(tiny_llm):
    greedy = run(tiny_llm, PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True),
                   SamplingParams(temperature=1.0, min_p=1.0, max_tokens=10, ignore_eos=True)):
        got = run(tiny_llm, PROMPTS, params)
        assert [g.outputs[0].token_ids for g in got] == [g.outputs[0].token_ids for g in greedy]


def test_logprobs_and_prompt_logprobs(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = run(tiny_llm, [PROMPTS[2]], params)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    total = 0.0
    for token, entry in zip(comp.token_ids, comp.logprobs):
        assert token in entry and len(entry) in (3, 4)
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert max(lp.logprob for lp in entry.values()) == entry[token].logprob
        total += entry[token].logprob
    assert comp.cumulative_logprob == pytest.approx(total)
    assert len(out.prompt_logprobs) == len(PROMPTS[2]) and out.prompt_logprobs[0] is None
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert PROMPTS[2][pos] in entry


def test_stop_strings_are_not_leaked(tiny_llm):
    # Seeded sampling gives the same tokens on every run, so a run with a stop
    # string must end exactly where that string first appears.
    common = dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    text = run(tiny_llm, [PROMPTS[0]], SamplingParams(**common))[0].outputs[0].text
    printable = [i for i in range(len(text) - 3) if text[i:i + 3].isprintable()]
    assert printable, repr(text)
    stop = text[printable[len(printable) // 2]:][:3]
    cut = text[: text.index(stop)]
    got = run(tiny_llm, [PROMPTS[0]], SamplingParams(stop=[stop], **common))[0].outputs[0]
    assert got.text == cut and got.finish_reason == "stop" and got.stop_reason == stop
    kept = run(tiny_llm, [PROMPTS[0]], SamplingParams(stop=stop, include_stop_str_in_output=True,
                                                      **common))[0].outputs[0]
    assert kept.text == cut + stop


def test_stop_token_ids_and_max_tokens(tiny_llm):
    base = run(tiny_llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ids = base.outputs[0].token_ids
    assert base.outputs[0].finish_reason == "length" and len(ids) == 8
    stop_id = ids[4]
    got = run(tiny_llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id],
                                                     ignore_eos=True))[0].outputs[0]
    first = ids.index(stop_id)
    assert got.token_ids == ids[: first + 1] and got.stop_reason == stop_id
    # min_tokens keeps the stop token from ending the output early.
    held = run(tiny_llm, [PROMPTS[1]], SamplingParams(temperature=0, max_tokens=8, min_tokens=8,
               stop_token_ids=[stop_id], ignore_eos=True))[0].outputs[0]
    assert len(held.token_ids) == 8 and stop_id not in held.token_ids[: 8]


def _seq(tokens, num_prompt, **params):
    req = Request("x", None, tokens[:num_prompt], SamplingParams(**params), frozenset({2}))
    return Sequence(req, 0, list(tokens), num_prompt)


def test_penalties_lower_seen_tokens():
    logits = torch.zeros(3, 10)
    logits[:, 4] = 2.0
    logits[:, 5] = -1.0
    seqs = [_seq([4, 5, 5], 1, temperature=0, repetition_penalty=2.0),
            _seq([4, 5, 5], 1, temperature=0, frequency_penalty=1.5),
            _seq([4, 5, 5], 1, temperature=0, presence_penalty=2.0)]
    from pllm.core.sampler import _apply_penalties

    logits = _apply_penalties(logits, SamplingMetadata.build(seqs, 10, torch.device("cpu")).penalties)
    assert logits[0, 4] == 1.0 and logits[0, 5] == -2.0  # divided / multiplied
    assert logits[1, 5] == -1.0 - 3.0 and logits[1, 4] == 2.0  # only output tokens count
    assert logits[2, 5] == -3.0 and logits[2, 4] == 2.0
    # In a mixed batch only the penalised row is counted and changed.
    mixed = [_seq([4, 5], 1, temperature=0), _seq([4, 5, 5], 1, temperature=0,
                                                   presence_penalty=2.0)]
    md = SamplingMetadata.build(mixed, 10, torch.device("cpu"))
    assert md.penalties.rows.tolist() == [1] and md.penalties.seen.shape == (1, 10)
    base = torch.zeros(2, 10)
    changed = _apply_penalties(base, md.penalties)
    assert changed[0].eq(0).all() and changed[1, 5] == -2.0 and changed[1, 4] == 0.0
    # The penalty flips greedy away from the repeated token.
    penalised = [_seq([1, 1], 1, temperature=0, presence_penalty=0.5)]
    assert sample(torch.tensor([[0.0, 1.0, 0.9]]),
                  SamplingMetadata.build(penalised, 3, torch.device("cpu"))).token_ids == [2]


def test_sampling_never_brings_logits_rows_to_the_host(monkeypatch):
    """Every kind of row (plain greedy, logprobs, penalties, min_tokens,
    random draws, seeds) is sampled where the logits are: what crosses to
    the host is token ids and the few logprobs asked for, never a tensor of
    vocabulary width. (On the CPU "the host" is the same memory, so the
    test watches the conversions a copy would go through.)"""
    vocab = 50
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plain = [_seq([3, 4], 1, temperature=0) for _ in range(4)]

    def guard(name):
        original = getattr(torch.Tensor, name)

        def watched(self, *args, **kwargs):
            if self.numel() >= vocab:
                raise AssertionError(f"{name}() of a {tuple(self.shape)} tensor")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, watched)

    def run(seqs):
        return sample(logits, SamplingMetadata.build(seqs, vocab, torch.device("cpu")))

    expected = logits.float().argmax(-1).tolist()
    for name in ("cpu", "numpy", "tolist", "item"):
        guard(name)
    assert run(plain).token_ids == expected
    for needs_row in (dict(temperature=0, logprobs=2), dict(temperature=0, presence_penalty=0.5),
                      dict(temperature=0, min_tokens=3), dict(temperature=0.7),
                      dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=3)):
        result = run(plain[:3] + [_seq([3, 4], 1, **needs_row)])
        assert result.token_ids[:3] == expected[:3]
        assert 0 <= result.token_ids[3] < vocab


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", dict(temperature=-0.1)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("n", dict(n=0)),
    ("max_tokens", dict(max_tokens=0)),
])
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_name_the_field(tiny_llm):
    with pytest.raises(ValueError, match="prompt"):
        run(tiny_llm, [""], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        run(tiny_llm, [[5] * 200], SamplingParams())  # max_model_len is 128
    with pytest.raises(ValueError, match="context"):
        run(tiny_llm, [[5] * 128], SamplingParams())
    assert_no_leak(tiny_llm)


def test_abort_frees_blocks(tiny_llm):
    engine = tiny_llm.llm_engine
    engine.add_request("a1", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("a2", PROMPTS[0], SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    engine.abort_request(["a1", "a2"])
    assert_no_leak(tiny_llm)
