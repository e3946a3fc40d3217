"""Speculative decoding's draft model, on the workers.

The draft model is a second, smaller model run by the same platform, in
the same dtype and with the same tensor parallelism. Its K/V live in a cache
of its own with as many blocks as the target's, and it shares the target's
block tables: block ``b`` of a sequence holds the target's K/V of those
tokens in one cache and the draft's in the other, so the KV manager's one
allocation (prefix hits, copy-on-write, preemption) serves both models.

Each step, before the target's pass, the draft model runs:

1. **catch-up**: one pass over what the scheduled sequences have that the
   draft's cache lacks (from ``Sequence.num_draft_computed``; a prefill
   chunk's tokens, a decode's one token, or two after a step that kept all
   its drafts, as decode rows sharing the block table), as the scheduler
   planned it (``ScheduledSeq.draft_catch_up``: at most
   ``max_num_batched_tokens`` over the step, nothing while speculation is
   off at large batches). For a speculating sequence the logits of its last
   token give the first draft.
2. **drafting**: ``k - 1`` passes of one decode row per speculating
   sequence, each feeding the draft just proposed.

A greedy request's drafts are the draft model's argmax; a sampled
request's are drawn from ``q``, the draft's distribution after the
request's temperature, top-k, top-p and min-p, and the verify step accepts
each with ``min(1, p / q)`` and otherwise draws from the residual (``sampler.
verify``). Every rank runs the same passes from rank 0's plan: the logits
are gathered over the vocabulary on every rank, and each sampled sequence
draws from a generator seeded by the plan (from the request's own stream
when it has a seed), so every rank feeds the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pllm.core.request import Sequence
from pllm.core.runner import ModelRunner, StepInputs
from pllm.core.sampler import generator_for, sample_drafts
from pllm.core.sampling_params import SamplingParams
from pllm.core.scheduler import SchedulerOutput


@dataclass
class DraftPlan:
    """One step's draft work: built by rank 0, sent to the other ranks."""

    catch_up: StepInputs | None  # sample_rows: each speculating sequence's last token
    block_copies: list[tuple[int, int]]  # the step's copy-on-write, in the draft's cache too
    seq_ids: list[int]  # the speculating sequences, in sample_rows' order
    num_drafts: list[int]  # how many drafts each one gets
    positions: list[int]  # the position of each one's last token
    block_tables: list[list[int]]
    params: list[SamplingParams]  # each one's request's
    seeds: list[int]  # of each one's draws this step


def flat_inputs(rows: list[tuple[list[int], int, list[int], bool]], block_size: int,
                block_copies: list[tuple[int, int]] = ()) -> tuple[StepInputs, list[int]]:
    """A flat batch of ``(token_ids, first position, block table, sampled)``
    rows, single-token rows first (decodes); the logits of a sampled row's
    last token are kept. Returns the inputs and the sampled rows' indices
    into ``rows``, in their order in the batch."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) != 1)
    input_ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    sample_rows, sampled = [], []
    for i in order:
        tokens, lo, table, sample = rows[i]
        input_ids += tokens
        positions += range(lo, lo + len(tokens))
        slots += (table[p // block_size] * block_size + p % block_size
                  for p in range(lo, lo + len(tokens)))
        starts.append(starts[-1] + len(tokens))
        seq_lens.append(lo + len(tokens))
        if sample:
            sample_rows.append(starts[-1] - 1)
            sampled.append(i)
    width = max(len(rows[i][2]) for i in order)
    tables = torch.zeros(len(rows), width, dtype=torch.int32)
    for row, i in enumerate(order):
        tables[row, : len(rows[i][2])] = torch.tensor(rows[i][2], dtype=torch.int32)
    num_decodes = sum(1 for i in order if len(rows[i][0]) == 1)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=tables, query_start_loc=starts, seq_lens=seq_lens, num_decodes=num_decodes,
        block_copies=list(block_copies), sample_rows=sample_rows,
    ), sampled


class DraftRunner:
    """Proposes drafts with the draft model: ``runner`` is a ModelRunner over
    the draft model and its own cache."""

    def __init__(self, runner: ModelRunner, keep_probs: bool = True) -> None:
        self.runner = runner
        self.block_size = runner.block_size
        # Whether propose returns the sampled drafts' q (rank 0, which
        # verifies; the other ranks only run the passes).
        self.keep_probs = keep_probs

    def plan(self, sched: SchedulerOutput) -> DraftPlan | None:
        """The step's draft work (rank 0): each scheduled sequence's catch-up
        (``ScheduledSeq.draft_catch_up``, which for one with drafts to fill
        ends at its last token, sampled). None: nothing to do."""
        rows, row_items = [], []
        for item in sched.scheduled:
            if item.draft_catch_up is None:
                continue
            seq = item.seq
            start, end = item.draft_catch_up
            tokens = seq.token_ids[start:end]
            if seq.num_computed_tokens >= seq.num_prompt_tokens and len(tokens) <= 8:
                # A decoding sequence's catch-up (a token or two): decode rows
                # through its block table, as the verify pass lays drafts, so
                # that the pass stays decode-only.
                for j, token in enumerate(tokens):
                    rows.append(([token], start + j, seq.block_ids,
                                 bool(item.draft) and j == len(tokens) - 1))
                    row_items.append(item)
            else:
                rows.append((tokens, start, seq.block_ids, bool(item.draft)))
                row_items.append(item)
        if not rows:
            if not sched.block_copies:
                return None
            return DraftPlan(None, list(sched.block_copies), [], [], [], [], [], [])
        catch_up, sampled = flat_inputs(rows, self.block_size, sched.block_copies)
        items = [row_items[i] for i in sampled]
        return DraftPlan(
            catch_up=catch_up, block_copies=list(sched.block_copies),
            seq_ids=[item.seq.seq_id for item in items],
            num_drafts=[len(item.draft) for item in items],
            positions=[item.seq.num_computed_tokens + item.num_new_tokens - len(item.draft) - 1
                       for item in items],
            block_tables=[item.seq.block_ids for item in items],
            params=[item.seq.request.params for item in items],
            seeds=[self._seed(item.seq) for item in items],
        )

    def _seed(self, seq: Sequence) -> int:
        """A seed for the sequence's draws this step: from its own stream
        when the request has a seed (reproducible), else the global one."""
        if seq.request.params.greedy:
            return 0
        gen = generator_for(seq, self.runner.device)
        device = gen.device if gen is not None else "cpu"
        return int(torch.randint(2**62, (), generator=gen, device=device))

    def propose(self, plan: DraftPlan) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Run the plan (every rank). Returns seq_id -> its drafts, and for
        the sampled sequences seq_id -> ``q`` ``[drafts, vocab]``, each
        draft's distribution."""
        if plan.catch_up is None:  # nothing to compute: only the step's copies
            self.runner.backend.copy_blocks(self.runner.kv_caches, plan.block_copies)
            return {}, {}
        n = len(plan.seq_ids)
        drafts: list[list[int]] = [[] for _ in range(n)]
        probs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        generators = [None] * n
        inputs, active = plan.catch_up, list(range(n))
        for step in range(max(plan.num_drafts, default=1)):  # the catch-up always runs
            if step:
                active = [i for i in active if plan.num_drafts[i] > step]
                rows = [([drafts[i][-1]], plan.positions[i] + step, plan.block_tables[i], True)
                        for i in active]
                inputs, order = flat_inputs(rows, self.block_size)
                active = [active[j] for j in order]
            logits, _ = self.runner.logits(self.runner.forward(inputs), inputs)
            if not active:
                break
            gens = [generators[i] for i in active]
            tokens, q, gens = sample_drafts(
                logits, [plan.params[i] for i in active], [plan.seeds[i] for i in active],
                None if all(g is None for g in gens) else gens)
            for j, (i, token) in enumerate(zip(active, tokens.tolist())):
                drafts[i].append(token)
                generators[i] = gens[j]
                if self.keep_probs and q is not None and not plan.params[i].greedy:
                    probs[i].append(q[j])
        return (dict(zip(plan.seq_ids, drafts)),
                {sid: torch.stack(rows) for sid, rows in zip(plan.seq_ids, probs) if rows})


def check_draft_model(target, draft, tensor_parallel_size: int, platform=None) -> None:
    """A draft model the target can verify: the same vocabulary, token for
    token, heads that split over the ranks, and (given the ``platform``)
    attention the platform runs (its window, soft-cap, head size). ``target``
    and ``draft`` are loaded models (``pllm.loader.LoadedModel``); raises
    ``ValueError``."""
    from pllm.core.resolve import check_model_fits
    from pllm.models import describe_model

    where = f"draft model {draft.path}"
    try:
        info = describe_model(draft.hf_config, tensor_parallel_size)
        if platform is not None:
            check_model_fits(info, platform)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    sizes = target.hf_config.vocab_size, draft.hf_config.vocab_size
    if sizes[0] != sizes[1]:
        raise ValueError(f"{where} has a vocabulary of {sizes[1]} tokens, the target "
                         f"{sizes[0]}: a draft must share the target's tokenizer")
    theirs = draft.tokenizer.get_vocab()
    for token, token_id in sorted(target.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if theirs.get(token) != token_id:
            raise ValueError(f"{where} has another tokenizer: {token!r} is token {token_id} of "
                             f"the target's and {theirs.get(token)} of the draft's")
