"""Beam search as vLLM's ``LLM.beam_search`` does it, but inside the engine:
the beams are sequences of one request, and share their blocks.

A beam-search request starts as one sequence. Each step every live beam
computes its last token and, instead of appending a sample, holds its
proposals (``Sequence.candidates``: the step's logprobs entry, the
``2 * beam_width`` most likely tokens of the raw logits). A beam holding
them waits, unscheduled, until every beam of its request has proposed
(chunks, the token budget and preemption can split them over steps); then
the scheduler applies :func:`select`::

    beams, best first     A -1.0                        B -1.3
    their proposals       a1 -0.2, a2 -0.4, EOS -0.5    b1 -0.05, b2 -0.6
    EOS ends a hypothesis A+EOS -1.5 (kept on the request)
    the others, ranked    A+a1 -1.2, B+b1 -1.35, A+a2 -1.4, B+b2 -1.9
    beam_width 3 go on    A+a1, B+b1, A+a2 (A is forked once)

A beam chosen ``k`` times goes on with one proposal and is forked ``k - 1``
times (the forks share its blocks, copied on write); a beam not chosen is
freed. At ``max_tokens`` (or a full context) the live beams end too, and the
request's one output lists the best ``beam_width`` hypotheses by
:func:`score`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pllm.core.outputs import CompletionOutput, LogprobsDict, RequestOutput
from pllm.core.request import Request, Sequence
from pllm.core.sampling_params import BeamSearchParams


@dataclass
class Hypothesis:
    """A beam as a result: the whole sequence (prompt first) and its score's parts."""

    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[LogprobsDict]
    finish_reason: str | None  # "stop" (EOS), "length", "abort"; None while it goes on


@dataclass
class Choice:
    """A proposal chosen to go on: ``parent`` extended by ``token``."""

    parent: Sequence
    token: int
    cumulative_logprob: float


def score(num_tokens: int, last_token: int, cumulative_logprob: float,
          eos_token_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's ``get_beam_search_score`` (after transformers'): the length is
    the whole sequence's, prompt included, less a final EOS token."""
    length = num_tokens - (last_token in eos_token_ids)
    return cumulative_logprob / length ** length_penalty


def select(beams: list[Sequence], params: BeamSearchParams,
           eos_token_ids: frozenset[int]) -> tuple[list[Choice], list[Hypothesis]]:
    """The next beams, best first, and the hypotheses EOS ended, from
    ``beams`` (best first, of one length, each holding its proposals). As
    vLLM: every proposal extends its beam; an EOS one (unless
    ``ignore_eos``) is a finished hypothesis, the others are ranked by
    :func:`score` (ties in proposal order) and the best ``beam_width`` go on."""
    going: list[Choice] = []
    ended: list[Hypothesis] = []
    for beam in beams:
        for token, logprob in beam.candidates.items():
            cumulative = beam.cumulative_logprob + logprob.logprob
            if token in eos_token_ids and not params.ignore_eos:
                ended.append(Hypothesis(beam.token_ids + [token], cumulative,
                                        beam.logprobs + [beam.candidates], "stop"))
            else:
                going.append(Choice(beam, token, cumulative))
    num_tokens = beams[0].num_tokens + 1
    going.sort(key=lambda c: score(num_tokens, c.token, c.cumulative_logprob, eos_token_ids,
                                   params.length_penalty), reverse=True)
    return going[:params.beam_width], ended


def best(req: Request) -> list[Hypothesis]:
    """The request's best ``beam_width`` hypotheses, best first: those EOS
    ended, then its live beams (ties go to the ended ones, as in vLLM)."""
    params = req.params.beam_search
    hypotheses = req.completed_beams + [
        Hypothesis(list(s.token_ids), s.cumulative_logprob, list(s.logprobs),
                   s.status.value if s.is_finished else None) for s in req.seqs]
    hypotheses.sort(key=lambda h: score(len(h.token_ids), h.token_ids[-1], h.cumulative_logprob,
                                        req.eos_token_ids, params.length_penalty), reverse=True)
    return hypotheses[:params.beam_width]


def beam_output(req: Request, tokenizer) -> RequestOutput:
    """The request's output: one completion per hypothesis of :func:`best`,
    its text the generated tokens decoded."""
    skip = req.params.skip_special_tokens
    start = len(req.prompt_token_ids)
    return req.output_of([
        CompletionOutput(index=i, text=tokenizer.decode(h.token_ids[start:],
                                                        skip_special_tokens=skip),
                         token_ids=h.token_ids[start:], cumulative_logprob=h.cumulative_logprob,
                         logprobs=h.logprobs, finish_reason=h.finish_reason)
        for i, h in enumerate(best(req))])
