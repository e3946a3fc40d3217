"""Logits -> tokens, on the logits' device, from flat per-step tensors.

The runner turns the step's sampling rows (one per sample: a request with
``n > 1`` samples its first token ``n`` times from one row) into a
:class:`SamplingMetadata` of tensors on the device, once; :func:`sample`
then works on whole batches, and only token ids (and the few numbers of
requested logprobs) come back to the host.

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
class SamplingMetadata:
    """One step's sampling parameters, one row per sample, on ``device``.
    Tensors a step does not need are None (no penalties: no token counts)."""

    num_rows: int
    all_greedy: bool  # every row takes the argmax of its raw logits, nothing else
    any_random: bool  # some row draws (temperature > 0)
    greedy: torch.Tensor  # bool [R]
    temperature: torch.Tensor  # float [R] (1.0 on greedy rows)
    top_k: torch.Tensor | None  # long [R], vocab where unset
    top_p: torch.Tensor | None  # float [R]
    min_p: torch.Tensor | None  # float [R]
    repetition_penalty: torch.Tensor | None  # float [R]
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None
    seen: torch.Tensor | None  # bool [R, V]: in the prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # float [R, V]: occurrences in the output
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) held off by min_tokens
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingMetadata:
        params = [s.request.params for s in seqs]
        n = len(seqs)
        holding = [s.num_output_tokens < p.min_tokens for s, p in zip(seqs, params)]
        all_greedy = all(p.greedy and not p.has_penalties and p.logprobs is None and not h
                         for p, h in zip(params, holding))

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)

        greedy = torch.tensor([p.greedy for p in params]).to(device, non_blocking=True)
        temperature = floats([1.0 if p.greedy else p.temperature for p in params])
        top_k = top_p = min_p = None
        if any(p.top_k > 0 and not p.greedy for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params],
                                 dtype=torch.long).to(device, non_blocking=True)
        if any(p.top_p < 1.0 and not p.greedy for p in params):
            top_p = floats([p.top_p for p in params])
        if any(p.min_p > 0 and not p.greedy for p in params):
            min_p = floats([p.min_p for p in params])
        rep = freq = pres = seen = counts = None
        if any(p.has_penalties for p in params):
            rep = floats([p.repetition_penalty for p in params])
            freq = floats([p.frequency_penalty for p in params])
            pres = floats([p.presence_penalty for p in params])
            seen = _token_counts([s.token_ids for s in seqs], vocab_size, device) > 0
            counts = _token_counts([s.output_token_ids for s in seqs], vocab_size, device)
        banned = None
        pairs = [(row, t) for row, (s, p, h) in enumerate(zip(seqs, params, holding)) if h
                 for t in sorted(_min_tokens_banned(s))]
        if pairs:
            rows, ids = zip(*pairs)
            banned = (torch.tensor(rows, dtype=torch.long).to(device),
                      torch.tensor(ids, dtype=torch.long).to(device))
        return cls(n, all_greedy, not all(p.greedy for p in params), greedy, temperature, top_k, top_p, min_p, rep, freq, pres, seen,
                   counts, banned, [_generator(s, device) for s in seqs],
                   [p.logprobs for p in params])


def _min_tokens_banned(seq: Sequence) -> set[int]:
    p = seq.request.params
    banned = set(p.stop_token_ids)
    if not p.ignore_eos:
        banned |= seq.request.eos_token_ids
    return banned


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` occurrence counts, built on the device from one
    padded id tensor (the pad id ``vocab_size`` lands in a dropped column)."""
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), max(width, 1)), vocab_size, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long).clamp_(max=vocab_size)
    ids = ids.to(device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """A seeded sequence's own random stream, on the device, made on its first
    draw and kept on the sequence (its state is the stream's position)."""
    if seq.seed is None:
        return None
    if seq.generator is None or seq.generator.device.type != torch.device(device).type:
        seq.generator = torch.Generator(device=device).manual_seed(seq.seed)
    return seq.generator


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: the chosen token's logprob and rank, plus the top-k (id, logprob)
    # when the sequence asked for logprobs; None otherwise.
    logprobs: list[dict[int, Logprob] | None]


def _apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    rep = md.repetition_penalty.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(md.seen, penalised, logits)
    counts = md.output_counts
    return (logits - md.frequency_penalty.unsqueeze(1) * counts
            - md.presence_penalty.unsqueeze(1) * (counts > 0).float())


def _filter(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p."""
    logits = logits / md.temperature.clamp(min=1e-5).unsqueeze(1)
    if md.top_k is not None or md.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = md.top_k.unsqueeze(1) if md.top_k is not None else vocab
        drop = (ranks >= k).expand(logits.shape[0], -1)
        if md.top_p is not None:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            drop = drop | ((probs.cumsum(-1) - probs) >= md.top_p.unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if md.min_p is not None:
        probs = logits.softmax(-1)
        threshold = md.min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _draw(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """One token per row via the exponential race: argmax(p / E), E ~ Exp(1),
    which is a draw from p."""
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_()
    for row, gen in enumerate(md.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return (probs / noise).argmax(-1)


@torch.inference_mode()
def sample(logits: torch.Tensor, md: SamplingMetadata) -> SampleResult:
    """``logits`` ``[md.num_rows, vocab]`` (any dtype, on md's device) -> one
    token per row."""
    if md.all_greedy:
        # Widening to fp32 changes no order: only the ids cross to the host.
        return SampleResult(logits.argmax(-1).tolist(), [None] * md.num_rows)
    logits = logits.float()
    if md.seen is not None:
        logits = _apply_penalties(logits, md)
    if md.banned is not None:
        logits = logits.index_put(md.banned, torch.tensor(float("-inf"), device=logits.device))
    tokens = logits.argmax(-1)
    if md.any_random:
        tokens = torch.where(md.greedy, tokens, _draw(_filter(logits, md), md))
    token_list = tokens.tolist()
    logprobs: list[dict[int, Logprob] | None] = [None] * md.num_rows
    rows = [i for i, k in enumerate(md.num_logprobs) if k is not None]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        found = top_logprobs(logits[index].log_softmax(-1), tokens[index],
                             [md.num_logprobs[i] for i in rows])
        for i, entry in zip(rows, found):
            logprobs[i] = entry
    return SampleResult(token_list, logprobs)


def top_logprobs(logp: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[dict[int, Logprob]]:
    """Per row of ``logp`` ``[rows, vocab]``: the chosen token (``tokens[row]``)
    and the ``ks[row]`` most likely ones, each with its rank. Computed on the
    device; one small transfer brings the numbers back."""
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    ranks = (logp > chosen.unsqueeze(1)).sum(-1) + 1
    k = max(ks)
    values, ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    chosen, ranks, values, ids, tokens = (t.tolist() for t in (chosen, ranks, values, ids, tokens))
    result = []
    for row, want in enumerate(ks):
        entry = {tid: Logprob(val, rank) for rank, (tid, val)
                 in enumerate(zip(ids[row][:want], values[row][:want]), start=1)}
        if tokens[row] not in entry:
            entry = {tokens[row]: Logprob(chosen[row], ranks[row]), **entry}
        result.append(entry)
    return result
