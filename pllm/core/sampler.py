"""Logits -> tokens, for a batch of sequences with their own SamplingParams.

Order, as in vLLM: penalties and min_tokens on the raw logits, logprobs
from those (before temperature), then temperature, top-k, top-p, min-p, and
one draw per row. A seeded row draws its noise from its own generator, so
its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm.core.outputs import Logprob
from pllm.core.request import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: the chosen token's logprob and rank, plus the top-k (id, logprob)
    # when the sequence asked for logprobs; None otherwise.
    logprobs: list[dict[int, Logprob] | None]


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[1]
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            seen = seen[seen < vocab]
            vals = logits[row, seen]
            logits[row, seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if p.presence_penalty or p.frequency_penalty:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long)
            counts = torch.bincount(out[out < vocab], minlength=vocab).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def _apply_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for row, seq in enumerate(seqs):
        p = seq.request.params
        if seq.num_output_tokens < p.min_tokens:
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned |= seq.request.eos_token_ids
            if banned:
                logits[row, sorted(banned)] = float("-inf")


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on the rows that sample randomly."""
    temps = torch.tensor([max(s.request.params.temperature, 1e-5) for s in seqs],
                         dtype=logits.dtype).unsqueeze(1)
    logits = logits / temps
    top_ks = [s.request.params.top_k for s in seqs]
    top_ps = [s.request.params.top_p for s in seqs]
    min_ps = [s.request.params.min_p for s in seqs]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        k = torch.tensor([k if k > 0 else vocab for k in top_ks]).unsqueeze(1)
        ranks = torch.arange(vocab).unsqueeze(0)
        drop = ranks >= k
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = probs.cumsum(-1) - probs
        drop |= mass_before >= torch.tensor(top_ps, dtype=probs.dtype).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p > 0 for p in min_ps):
        probs = logits.softmax(-1)
        threshold = torch.tensor(min_ps, dtype=probs.dtype).unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _draw(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row via the exponential race: argmax(p / E), E ~ Exp(1),
    which is a draw from p."""
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs)
    unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_()
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i] = torch.empty(probs.shape[1]).exponential_(generator=s.generator)
    return (probs / noise).argmax(-1)


def _plain_greedy(seqs: list[Sequence]) -> bool:
    """Every row takes its argmax of the raw logits: greedy, no penalties, no
    min_tokens still to hold, no logprobs."""
    for s in seqs:
        p = s.request.params
        if (not p.greedy or p.has_penalties or p.logprobs is not None
                or s.num_output_tokens < p.min_tokens):
            return False
    return True


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """``logits`` ``[len(seqs), vocab]`` (any dtype/device) -> one token per sequence."""
    if _plain_greedy(seqs):
        # The argmax where the logits are (widening to fp32 changes no order):
        # only the token ids cross to the host, not [rows, vocab] logits.
        return SampleResult(logits.argmax(-1).tolist(), [None] * len(seqs))
    logits = logits.float().cpu()
    _apply_penalties(logits, seqs)
    _apply_min_tokens(logits, seqs)

    greedy = [s.request.params.greedy for s in seqs]
    tokens = logits.argmax(-1)
    random_rows = [i for i, g in enumerate(greedy) if not g]
    if random_rows:
        sub = [seqs[i] for i in random_rows]
        tokens[random_rows] = _draw(_filter(logits[random_rows], sub), sub)
    token_list = tokens.tolist()

    want = [s.request.params.logprobs for s in seqs]
    logprobs: list[dict[int, Logprob] | None] = [None] * len(seqs)
    if any(w is not None for w in want):
        rows = [i for i, w in enumerate(want) if w is not None]
        logp = logits[rows].log_softmax(-1)
        for j, i in enumerate(rows):
            logprobs[i] = top_logprobs(logp[j], token_list[i], want[i])
    return SampleResult(token_list, logprobs)


def top_logprobs(logp: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """The chosen token plus the ``k`` most likely ones, each with its rank."""
    chosen = float(logp[token])
    result: dict[int, Logprob] = {}
    if k > 0:
        values, ids = logp.topk(k)
        for rank, (tid, val) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
            result[tid] = Logprob(val, rank)
    if token not in result:
        rank = int((logp > chosen).sum()) + 1
        result = {token: Logprob(chosen, rank), **result}
    return result
