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

import functools
from dataclasses import dataclass

import torch

from pllm.core.outputs import Logprob
from pllm.core.request import Sequence
from pllm.core.sampling_params import SamplingParams


@dataclass
class Penalties:
    """Repetition / frequency / presence penalties of the rows that have any
    (``rows``), with their token counts: built for those rows only, so one
    penalised request does not make every row of the batch pay."""

    rows: torch.Tensor  # long [P]: which rows of the batch
    repetition: torch.Tensor  # float [P]
    frequency: torch.Tensor
    presence: torch.Tensor
    seen: torch.Tensor  # bool [P, V]: in the prompt or the output
    output_counts: torch.Tensor  # float [P, V]: occurrences in the output


@dataclass
class SamplingMetadata:
    """One step's sampling parameters, one row per sample, on ``device``.
    What a step does not need is None; a step of plain greedy rows (the
    common serving step) builds no tensor at all."""

    num_rows: int
    all_greedy: bool  # every row takes the argmax of its raw logits, nothing else
    any_random: bool = False  # some row draws (temperature > 0)
    greedy: torch.Tensor | None = None  # bool [R]
    temperature: torch.Tensor | None = None  # float [R] (1.0 on greedy rows)
    top_k: torch.Tensor | None = None  # long [R], vocab where unset
    top_p: torch.Tensor | None = None  # float [R]
    min_p: torch.Tensor | None = None  # float [R]
    penalties: Penalties | None = None
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, ids) held off by min_tokens
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # logit_bias: rows, ids, values
    generators: list[torch.Generator | None] | None = None
    num_logprobs: list[int | None] | None = None

    @classmethod
    def build(cls, seqs: list[Sequence], vocab_size: int, device: torch.device, *,
              num_rows: int | None = None, static: bool = False,
              ahead: list[list[int]] | None = None) -> SamplingMetadata:
        """``num_rows`` (at least ``len(seqs)``) pads with greedy rows past the
        real ones (static shapes: a bucket of rows). ``static`` always builds
        every filter tensor of a random step (top-k, top-p, min-p, at values
        that change nothing where unset), so that a compiled sampler serves
        every mix of requests. ``ahead`` (speculative decoding's rows): per
        row, the draft tokens before the position it scores, counted as
        output by the penalties and min_tokens, as if already accepted."""
        params = [s.request.params for s in seqs]
        num_rows = len(seqs) if num_rows is None else num_rows
        pad = num_rows - len(seqs)
        ahead = ahead or [[] for _ in seqs]
        # A grammar that has reached its end allows only its stop tokens:
        # there the grammar wins over min_tokens.
        holding = [s.num_output_tokens + len(a) < p.min_tokens
                   and not _grammar_done(s) for s, p, a in zip(seqs, params, ahead)]
        if all(p.greedy and not p.has_penalties and p.logprobs is None and not h
               and not p.logit_bias for p, h in zip(params, holding)):
            return cls(num_rows, all_greedy=True)

        def floats(values: list[float], fill: float | None = None) -> torch.Tensor:
            """One value per row, the padding rows' ``fill`` after them (when given)."""
            values = values if fill is None else values + [fill] * pad
            return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)

        md = cls(num_rows, all_greedy=False, any_random=not all(p.greedy for p in params),
                 greedy=torch.tensor([p.greedy for p in params] + [True] * pad).to(device, non_blocking=True),
                 temperature=floats([1.0 if p.greedy else p.temperature for p in params], 1.0),
                 generators=[generator_for(s, device) for s in seqs] + [None] * pad,
                 num_logprobs=[p.logprobs for p in params] + [None] * pad)
        every = static and md.any_random
        if every or any(p.top_k > 0 and not p.greedy for p in params):
            md.top_k = torch.tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size
                                     for p in params]
                                    + [vocab_size] * pad, dtype=torch.long).to(device, non_blocking=True)
        if every or any(p.top_p < 1.0 and not p.greedy for p in params):
            md.top_p = floats([p.top_p for p in params], 1.0)
        if every or any(p.min_p > 0 and not p.greedy for p in params):
            md.min_p = floats([p.min_p for p in params], 0.0)
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if rows:
            md.penalties = Penalties(
                rows=torch.tensor(rows, dtype=torch.long).to(device),
                repetition=floats([params[i].repetition_penalty for i in rows]),
                frequency=floats([params[i].frequency_penalty for i in rows]),
                presence=floats([params[i].presence_penalty for i in rows]),
                seen=_token_counts([seqs[i].token_ids + ahead[i] for i in rows], vocab_size,
                                   device) > 0,
                output_counts=_token_counts([seqs[i].output_token_ids + ahead[i] for i in rows],
                                            vocab_size, device))
        pairs = [(row, t) for row, (s, h) in enumerate(zip(seqs, holding)) if h
                 for t in sorted(_min_tokens_banned(s))]
        if pairs:
            banned_rows, ids = zip(*pairs)
            md.banned = (torch.tensor(banned_rows, dtype=torch.long).to(device),
                         torch.tensor(ids, dtype=torch.long).to(device))
        biased = [(row, t, v) for row, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        if biased:
            rows_, ids_, values = zip(*biased)
            md.bias = (torch.tensor(rows_, dtype=torch.long).to(device),
                       torch.tensor(ids_, dtype=torch.long).to(device),
                       torch.tensor(values, dtype=torch.float32).to(device))
        return md

    @classmethod
    def dummy(cls, num_rows: int, vocab_size: int, device: torch.device, *,
              random: bool, seeded: bool = False) -> SamplingMetadata:
        """Metadata of the shapes a static ``build`` gives for ``num_rows``
        rows: every row greedy, or every row random with every filter, and
        with ``seeded`` a seeded first row (the runner's warm-up compiles the
        sampler with each)."""
        if not random:
            return cls(num_rows, all_greedy=True)

        def full(value, dtype=torch.float32) -> torch.Tensor:  # made on the host, as build's
            return torch.full((num_rows,), value, dtype=dtype).to(device)

        return cls(num_rows, all_greedy=False, any_random=True,
                   greedy=full(False, torch.bool), temperature=full(1.0),
                   top_k=full(vocab_size, torch.long), top_p=full(1.0), min_p=full(0.0),
                   generators=[_seeded(0, device) if seeded else None] + [None] * (num_rows - 1),
                   num_logprobs=[None] * num_rows)


def _grammar_done(seq: Sequence) -> bool:
    matcher = getattr(seq, "matcher", None)
    return matcher is not None and matcher.is_completed()


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


def generator_for(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """A seeded sequence's own random stream, made on its first draw and kept
    on the sequence (its state is the stream's position): on the device, or
    on the host where the device has no generators (XLA); the draw then
    comes over with the step's other inputs."""
    if seq.seed is None:
        return None
    home = _generator_device(torch.device(device))
    if seq.generator is None or seq.generator.device.type != home.type:
        seq.generator = _seeded(seq.seed, home)
    return seq.generator


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=_generator_device(torch.device(device))).manual_seed(seed)


@functools.cache
def _generator_device(device: torch.device) -> torch.device:
    try:
        torch.Generator(device=device)
    except RuntimeError:
        return torch.device("cpu")
    return device


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: the chosen token's logprob and rank, plus the top-k (id, logprob)
    # when the sequence asked for logprobs; None otherwise.
    logprobs: list[dict[int, Logprob] | None]
    # verify() only: per row, whether the row's draft token was accepted.
    accepted: list[bool] | None = None


def _apply_penalties(logits: torch.Tensor, pen: Penalties) -> torch.Tensor:
    """``logits`` (fp32) with the penalised rows changed."""
    rows = logits[pen.rows]
    rep = pen.repetition.unsqueeze(1)
    rows = torch.where(pen.seen, torch.where(rows > 0, rows / rep, rows * rep), rows)
    counts = pen.output_counts
    rows = (rows - pen.frequency.unsqueeze(1) * counts
            - pen.presence.unsqueeze(1) * (counts > 0).float())
    return logits.index_copy(0, pen.rows, rows)


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
    # Host generators (a device without them, XLA): the whole noise is drawn
    # on the host, seeded rows from their own streams, and sent in one
    # transfer (one program for any number of seeded rows).
    on_host = any(g is not None and g.device.type != probs.device.type for g in md.generators)
    noise = torch.empty(probs.shape, dtype=probs.dtype,
                        device="cpu" if on_host else probs.device).exponential_()
    for row, gen in enumerate(md.generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return (probs / noise.to(probs.device)).argmax(-1)


def sample(logits: torch.Tensor, md: SamplingMetadata) -> SampleResult:
    """``logits`` ``[md.num_rows, vocab]`` (any dtype, on md's device) -> one
    token per row. Runs under the caller's autograd mode (the runner's
    ``autograd_off``)."""
    if md.all_greedy:
        # Widening to fp32 changes no order: only the ids cross to the host.
        return SampleResult(logits.argmax(-1).tolist(), [None] * md.num_rows)
    logits = _adjusted(logits, md)
    tokens = logits.argmax(-1)
    if md.any_random:
        tokens = torch.where(md.greedy, tokens, _draw(_filter(logits, md), md))
    return SampleResult(tokens.tolist(), _row_logprobs(logits, tokens, md))


def _adjusted(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """fp32 logits with the penalties, logit_bias and the min_tokens bans
    applied (what logprobs are taken from, before temperature)."""
    logits = logits.float()
    if md.penalties is not None:
        logits = _apply_penalties(logits, md.penalties)
    if md.bias is not None:
        rows, ids, values = md.bias
        logits = logits.index_put((rows, ids), values, accumulate=True)
    if md.banned is not None:
        logits = logits.index_put(md.banned, torch.tensor(float("-inf"), device=logits.device))
    return logits


def _row_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                  md: SamplingMetadata) -> list[dict[int, Logprob] | None]:
    """Per row, the logprobs of ``tokens[row]`` and the top ones, where the row asked for them."""
    logprobs: list[dict[int, Logprob] | None] = [None] * md.num_rows
    rows = [i for i, k in enumerate(md.num_logprobs or []) if k is not None]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        found = top_logprobs(logits[index].log_softmax(-1), tokens[index],
                             [md.num_logprobs[i] for i in rows])
        for i, entry in zip(rows, found):
            logprobs[i] = entry
    return logprobs


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


def _uniform(md: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row, seeded rows' from their own streams (on the
    host where the device has no generators, as ``_draw`` does)."""
    on_host = any(g is not None and g.device.type != torch.device(device).type
                  for g in md.generators)
    u = torch.rand(md.num_rows, device="cpu" if on_host else device)
    for row, gen in enumerate(md.generators):
        if gen is not None:
            u[row] = torch.rand((), generator=gen, device=gen.device).to(u.device)
    return u.to(device)


def verify(logits: torch.Tensor, md: SamplingMetadata, drafts: list[int],
           draft_probs: torch.Tensor | None = None) -> SampleResult:
    """Speculative decoding's check of one draft token per row
    (``pllm.core.spec_decode``): ``drafts[row]`` is the token proposed for
    the position the row scores, or -1 on a row without one (the bonus
    position after a sequence's last draft). Rows are the target model's
    logits, one sequence's positions consecutive, with the sequence's
    sampling parameters repeated on each of them. ``draft_probs``
    ``[rows, vocab]``: the distribution ``q`` each draft was drawn from (a
    draft model's); None: every draft is a point mass (``q = 1`` at it).

    Per row, ``accepted``: a greedy row accepts a draft equal to its argmax;
    a random row accepts it with probability ``min(1, p(draft) / q(draft))``,
    ``p`` after temperature, top-k, top-p and min-p (for a point mass,
    ``p(draft)``). ``token_ids``: what the row gives when its draft is
    rejected (the argmax, or a draw from the normalised residual ``max(0, p
    - q)``: for a point mass, ``p`` with the draft's mass taken out), or on
    a row without a draft its plain sample. ``logprobs``: of the token the
    row emits, the draft when accepted. Penalties and min_tokens bans apply
    as in :func:`sample`, each row's from its own context: ``md`` built
    with ``ahead``, the drafts before the row's position."""
    device = logits.device
    draft = torch.tensor(drafts, dtype=torch.long).to(device)
    has_draft = draft >= 0
    safe = draft.clamp(min=0).unsqueeze(1)
    logits = _adjusted(logits, md)
    argmax = logits.argmax(-1)
    accepted = has_draft & (argmax == draft)
    tokens = argmax
    if md.any_random:
        filtered = _filter(logits, md)
        p = filtered.softmax(-1)
        p_draft = p.gather(1, safe).squeeze(1)
        if draft_probs is None:
            random_accept = has_draft & (_uniform(md, device) < p_draft)
            # The residual max(0, p - q) of a point mass q: p without the draft.
            # Where p(draft) is 1 the draft is always accepted and the row's draw unused.
            take_out = (has_draft & (p_draft < 1)).unsqueeze(1)
            residual = torch.where(take_out, filtered.scatter(1, safe, float("-inf")), filtered)
        else:
            q = draft_probs.to(device=device, dtype=p.dtype)
            q_draft = q.gather(1, safe).squeeze(1)
            # u < p / q, as u * q < p: a draft q never gives (q = 0) is never taken.
            random_accept = has_draft & (_uniform(md, device) * q_draft < p_draft)
            residual = (p - q).clamp(min=0)
            mass = residual.sum(-1, keepdim=True)
            # Where p <= q everywhere (p = q) every draft is accepted; the draw is unused.
            use = has_draft.unsqueeze(1) & (mass > 0)
            residual = torch.where(use, residual / mass.clamp(min=1e-30), p).log()
        tokens = torch.where(md.greedy, argmax, _draw(residual, md))
        accepted = torch.where(md.greedy, accepted, random_accept)
    emitted = torch.where(accepted, draft, tokens)
    return SampleResult(tokens.tolist(), _row_logprobs(logits, emitted, md),
                        accepted=accepted.tolist())


def sample_drafts(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                  generators: list[torch.Generator | None] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Generator | None]]:
    """A draft model's proposals, one per row of its ``logits``: the argmax
    for a greedy request, otherwise a draw from ``q``, the row's
    distribution after the request's temperature, top-k, top-p and min-p
    (not its penalties: any ``q`` keeps :func:`verify` exact, a closer one
    is accepted more often). Each row draws from a generator seeded with
    ``seeds[row]`` (made here on the first call, then passed back in), so
    every tensor-parallel rank draws the same tokens from the same logits.
    Returns the tokens, ``q`` (None when every row is greedy) and the
    generators."""
    device = logits.device
    if all(p.greedy for p in params):
        return logits.argmax(-1), None, [None] * len(params)
    if generators is None:
        generators = [None if p.greedy else _seeded(seed, device) for p, seed in zip(params, seeds)]
    vocab = logits.shape[1]
    md = SamplingMetadata(
        len(params), all_greedy=False, any_random=True,
        greedy=torch.tensor([p.greedy for p in params]).to(device),
        temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params]).to(device),
        top_k=torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params],
                           dtype=torch.long).to(device),
        top_p=torch.tensor([p.top_p for p in params]).to(device),
        min_p=torch.tensor([p.min_p for p in params]).to(device),
        generators=generators)
    logits = logits.float()
    filtered = _filter(logits, md)
    tokens = torch.where(md.greedy, logits.argmax(-1), _draw(filtered, md))
    return tokens, filtered.softmax(-1), generators
