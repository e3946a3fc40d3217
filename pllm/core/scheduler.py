"""Continuous batching over a token budget, and the one owner of request state.

``schedule()``: running sequences first (in arrival order), each asking for
the rest of its tokens (one, for a decode; a chunk, for a long prefill);
then waiting sequences, first come first served, while budget, sequence
slots and blocks last. When blocks run out for a running sequence, the
newest running sequence is preempted: its blocks are freed and it goes back
to the front of the waiting queue to be recomputed later (its tokens are
kept, so the result is unchanged).

``update_from_output()``: what the executor computed becomes request state:
progress, sampled tokens, forks, stops, finished requests freed. A beam
search's beams hold their proposals instead, and advance together once all
have proposed (``pllm.core.beam_search``).

Who writes each field of a request's state (nothing else does)::

    Scheduler     Sequence.status, num_computed_tokens, num_draft_computed, token_ids, stop_reason,
                  logprobs, cumulative_logprob, candidates; Request.metrics, prompt_logprobs,
                  num_cached_tokens, forked, seqs (beam search), completed_beams;
                  the waiting/running queues
    KVCacheManager  Sequence.block_ids, block_hashes, num_cached_blocks
    Detokenizer   Sequence.text, prefix_offset, read_offset
    sampler       Sequence.generator (a seeded sample's random stream)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pllm.core import beam_search
from pllm.core.config import SchedulerConfig
from pllm.core.detokenizer import Detokenizer, visible_text
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.outputs import LogprobsDict, RequestOutput
from pllm.core.request import Request, Sequence, SequenceStatus, sample_seed
from pllm.core.spec_decode import (
    DraftModelProposer,
    SpecDecodeStats,
    accepted_tokens,
    can_speculate,
)
from pllm.core.stop import length_stop, text_stop, token_stop

if TYPE_CHECKING:
    from pllm.core.runner import RunnerOutput

logger = logging.getLogger("pllm")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # Siblings made this step (a request with n > 1 samples its first token):
    # each samples from the same logits row and joins the batch afterwards.
    forks: list[Sequence] = field(default_factory=list)
    # Speculative decoding: tokens proposed after the sequence's last one,
    # computed in this step after it (counted in num_new_tokens) and verified.
    # A draft model's are placeholders (DRAFT_PENDING) until the step's
    # workers propose them (RunnerOutput.drafts).
    draft: list[int] = field(default_factory=list)
    # A draft model's catch-up this step: the tokens [lo, hi) it computes
    # (K/V in its own cache) before it proposes; None: it runs nothing for
    # this sequence.
    draft_catch_up: tuple[int, int] | None = None

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last known token."""
        return (self.seq.num_computed_tokens + self.num_new_tokens - len(self.draft)
                == self.seq.num_tokens)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # taken from the waiting queue now

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, detokenizer: Detokenizer,
                 max_model_len: int, proposer=None, pipeline_depth: int = 1) -> None:
        """``pipeline_depth``: batches in flight at once (pipeline parallelism's
        stages); each batch then takes at most its share of the running
        sequences, so that the next one has work too."""
        self.config = config
        self.pipeline_depth = pipeline_depth
        # Speculative decoding's proposer (pllm.core.spec_decode); None: off.
        self.proposer = proposer
        # Structured outputs' grammars (pllm.core.structured.GrammarCache),
        # made by the engine on the first request that has one.
        self.grammars = None
        self.speculating = True  # off in steps with disable_by_batch_size sequences running
        self.spec_stats = SpecDecodeStats()
        self.kv = kv
        self.detokenizer = detokenizer
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}  # unfinished ones
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self._failed: list[RequestOutput] = []  # final outputs of failed requests, not yet taken
        # Requests admitted together in a step that failed: each is admitted
        # alone from then on, so the next failure names the one at fault.
        self.suspects: set[str] = set()
        self.step_budget = (StepBudget(config.target_step_latency_s,
                                       config.max_num_batched_tokens)
                            if config.target_step_latency_s else None)
        # Requests in a batch that was started and not yet applied (pipeline
        # parallelism keeps several batches in flight): none of their
        # sequences is scheduled, admitted or preempted until it is.
        self.in_flight: set[str] = set()

    def observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """How long a step took (the engine measures it), for the step budget."""
        if self.step_budget is not None and sched.scheduled:
            self.step_budget.observe(sched.num_tokens, seconds)

    # ---- requests in and out ----------------------------------------------
    def add_request(self, req: Request) -> None:
        """A new request, with its one sequence, joins the waiting queue."""
        seq = Sequence(req, 0, list(req.prompt_token_ids), len(req.prompt_token_ids),
                       seed=sample_seed(req.params, 0))
        self.detokenizer.start(seq)
        if req.params.logprobs is not None:
            seq.logprobs = []
        req.seqs.append(seq)
        self.requests[req.request_id] = req
        self.waiting.append(seq)

    def finish_requests(self, request_ids: list[str], status: SequenceStatus) -> None:
        """End these requests (an abort) and free their blocks; unknown ids are ignored."""
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            self.suspects.discard(rid)
            for seq in req.seqs if req is not None else ():
                if not seq.is_finished:
                    seq.status = status
                    self._remove(seq)

    def fail_request(self, req: Request, error: str) -> None:
        """End one request because something failed for it alone (its
        sampling, detokenizing, forking, stop check, or a step it was the
        newest admission of); the rest of the batch goes on. Its final output,
        carrying ``error``, comes with the next :meth:`take_failed`."""
        if self.requests.pop(req.request_id, None) is None:
            return
        self.suspects.discard(req.request_id)
        for seq in req.seqs:
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED_ABORTED
                self._remove(seq)
        req.metrics.finished_time = time.time()
        out = self._output(req)
        out.error = error
        self._failed.append(out)

    def requeue_as_suspects(self, seqs: list[Sequence]) -> None:
        """Undo the admission of ``seqs`` (their step did not run): back to
        the front of the waiting queue, in order, each to be admitted alone."""
        for seq in reversed(seqs):
            if seq.is_finished or seq not in self.running:
                continue
            self.running.remove(seq)
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.PREEMPTED
            self.waiting.appendleft(seq)
            self.suspects.add(seq.request.request_id)

    def take_failed(self) -> list[RequestOutput]:
        failed, self._failed = self._failed, []
        return failed

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    # ---- schedule -----------------------------------------------------------
    def schedule(self, admit: bool = True) -> SchedulerOutput:
        """The next step's batch; ``admit=False`` takes nobody from the waiting queue.

        With a step-latency target, decodes go first and, while any request is
        decoding, the prefill work of the step is what the measured step times
        say fits the target and the decoding streams' pace (see
        :class:`StepBudget`); with nobody decoding, prefills get the whole
        token budget."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        self._switch_speculation()
        running = list(self.running)
        # Pipeline parallelism: the running requests this batch may take.
        share = (-(-len({s.request.request_id for s in running}) // self.pipeline_depth)
                 if self.pipeline_depth > 1 else None)
        taken: set[str] = set()
        if self.step_budget is not None:
            decodes = [s for s in running if s.num_tokens - s.num_computed_tokens == 1]
            if decodes:
                running = decodes + [s for s in running if s.num_tokens - s.num_computed_tokens != 1]
                budget = min(budget, max(self.step_budget.tokens_for(len(decodes)),
                                         len(decodes) + self.kv.block_size))

        for seq in running:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.request.request_id in self.in_flight:
                continue
            if share is not None and seq.request.request_id not in taken and len(taken) >= share:
                continue  # the next batch's
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            if share is not None:
                taken.add(seq.request.request_id)
            draft = self._propose(seq, budget) if num_new == 1 else []
            if draft and not self.kv.allocate_slots(seq, 1 + len(draft)):
                draft = []  # no room for the lookahead: decode one token
            if draft:
                out.scheduled.append(ScheduledSeq(seq, 1 + len(draft), draft=draft))
                scheduled_ids.add(seq.seq_id)
                budget -= 1 + len(draft)
                continue
            while not self.kv.allocate_slots(seq, num_new):
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                scheduled_ids.add(seq.seq_id)
                budget -= num_new

        if not out.preempted and admit:
            self._admit_waiting(out, budget)
            self._unpark_for_waiting(out, budget)
        now = time.time()
        for item in out.scheduled:
            metrics = item.seq.request.metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or now
            req = item.seq.request
            if item.samples and not req.forked and req.params.n > 1:
                try:
                    item.forks = [item.seq.fork(i) for i in range(1, req.params.n)]
                    if item.seq.matcher is not None:  # no output yet: each its own, fresh
                        for child in item.forks:
                            child.matcher = self.grammars.matcher(req.grammar.result())
                except Exception as exc:  # noqa: BLE001 - this request's fault alone
                    self.fail_request(req, _describe("forking its samples", exc))
        if self._failed:
            out.scheduled = [s for s in out.scheduled if not s.seq.is_finished]
        if isinstance(self.proposer, DraftModelProposer):
            self._plan_draft_catch_up(out)
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _switch_speculation(self) -> None:
        """Speculation off while ``disable_by_batch_size`` sequences or more
        run, on again below; each switch is logged."""
        limit = getattr(self.proposer, "disable_by_batch_size", None)
        on = limit is None or len(self.running) < limit
        if on != self.speculating:
            logger.info("speculative decoding %s: %d sequences running (disable_by_batch_size %d)",
                        "on again" if on else "off", len(self.running), limit)
            self.speculating = on

    def _plan_draft_catch_up(self, out: SchedulerOutput) -> None:
        """What the draft model computes this step: for each sequence, in
        batch order, the tokens its cache lacks up to the target's last
        non-draft one, all within ``max_num_batched_tokens`` tokens over the
        step; a sequence with drafts needs all of its own, or its drafts are
        dropped. With speculation off the draft runs nothing and falls
        behind; it catches up within that budget once speculation is on."""
        if not self.speculating:
            return
        left = self.config.max_num_batched_tokens
        for item in out.scheduled:
            seq = item.seq
            if seq.matcher is not None:
                continue  # constrained: never speculates, so the draft needs nothing of it
            end = seq.num_computed_tokens + item.num_new_tokens - len(item.draft)
            start = seq.num_draft_computed
            if item.draft and end - start > left:
                item.num_new_tokens -= len(item.draft)
                item.draft = []
                self.kv.trim(seq, end)
            take = min(end - start, left)
            if take > 0:
                item.draft_catch_up = (start, start + take)
                left -= take

    def _cacheable(self, seq: Sequence) -> int:
        """The tokens whose K/V the prefix cache may hold: with a draft model
        (whose K/V share the blocks, ``pllm.core.draft``), only those both
        models computed, as a hit stands for both caches."""
        if isinstance(self.proposer, DraftModelProposer):
            return min(seq.num_computed_tokens, seq.num_draft_computed)
        return seq.num_computed_tokens

    def _propose(self, seq: Sequence, budget: int) -> list[int]:
        """Drafts for a decoding sequence (none without a proposer, or where
        they could not all be kept: past the budget, max_tokens or the context)."""
        if (self.proposer is None or not self.speculating or seq.matcher is not None
                or seq.num_tokens - seq.num_computed_tokens != 1):
            return []
        if not can_speculate(seq):
            return []
        room = min(budget, self.max_model_len - seq.num_tokens) - 1
        max_tokens = seq.request.params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - seq.num_output_tokens - 1)
        return self.proposer.propose(seq, room) if room > 0 else []

    def _grammar_ready(self, seq: Sequence) -> bool:
        """Whether a waiting sequence can run as far as its grammar goes:
        unconstrained, or compiled (its matcher made now). A grammar that
        failed to compile fails its request."""
        req = seq.request
        if req.grammar is None or seq.matcher is not None:
            return True
        if not req.grammar.done():
            return False
        try:
            seq.matcher = self.grammars.matcher(req.grammar.result())
        except Exception as exc:  # noqa: BLE001 - this request's grammar alone
            self.fail_request(req, _describe("compiling its grammar", exc))
            return False
        return True

    def pending_grammars(self) -> list:
        """The grammars (futures) that waiting sequences wait for, done or
        not: a grammar done since ``schedule`` looked is still pending here
        (its sequence is admitted by the next ``schedule``)."""
        return [s.request.grammar for s in self.waiting
                if s.request.grammar is not None and s.matcher is None]

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        held: list[Sequence] = []  # waiting for their grammars: the rest go ahead
        try:
            self._admit_ready(out, budget, held)
        finally:
            self.waiting.extendleft(reversed(held))

    def _admit_ready(self, out: SchedulerOutput, budget: int, held: list[Sequence]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.candidates is not None or seq.request.request_id in self.in_flight:
                # A preempted beam: nothing to compute until it goes on; or
                # a sequence whose request has a batch in flight.
                held.append(self.waiting.popleft())
                continue
            if not self._grammar_ready(seq):
                if not seq.is_finished:
                    held.append(self.waiting.popleft())
                continue
            if seq.request.request_id in self.suspects or (
                    out.admitted and out.admitted[-1].request.request_id in self.suspects):
                # A suspect (admitted in a step that failed) is admitted on its own.
                if out.admitted and out.admitted[-1].request is not seq.request:
                    break
            cached = self.kv.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached_tokens = len(cached) * self.kv.block_size
            num_new = seq.num_tokens - seq.num_computed_tokens - num_cached_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(seq, num_new, cached):
                break
            seq.num_computed_tokens += num_cached_tokens
            seq.num_draft_computed = seq.num_computed_tokens  # a cached block holds both models' K/V
            if seq.status is SequenceStatus.WAITING and seq.request.metrics.first_scheduled_time is None:
                self.kv.pool.record_query(seq.num_tokens, num_cached_tokens)
                seq.request.num_cached_tokens = num_cached_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            out.admitted.append(seq)
            budget -= num_new

    def _unpark_for_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Nothing runs, yet beams that wait for their siblings hold blocks
        and slots: their siblings (or anyone) may be waiting for those, and
        no step would free them. Preempt such beams, newest first, until a
        waiting sequence is admitted; each keeps its proposals, and is
        recomputed once it has its next token."""
        while not out.scheduled and self.waiting:
            parked = next((s for s in reversed(self.running) if s.candidates is not None
                           and s.request.request_id not in self.in_flight), None)
            if parked is None:
                return
            self._preempt(parked, out)
            self._admit_waiting(out, budget)

    def _pick_victim(self, scheduled_ids: set[int]) -> Sequence:
        # The newest running sequence not already in this step's batch; if all
        # are scheduled, the newest of all (its slot is then given back).
        # Never one in a batch in flight (its step is still writing its blocks).
        candidates = [s for s in self.running if s.request.request_id not in self.in_flight]
        for seq in reversed(candidates):
            if seq.seq_id not in scheduled_ids:
                return seq
        return candidates[-1]

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        if any(s.seq is seq for s in out.scheduled):
            out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    # ---- update -------------------------------------------------------------
    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Apply one executed step; returns the outputs of the requests it changed."""
        for item in sched.scheduled:
            seq, samples = item.seq, item.samples
            if seq.is_finished:  # aborted while its batch was in flight
                continue
            if seq.seq_id in result.prompt_logprobs:
                self._add_prompt_logprobs(seq, result.prompt_logprobs[seq.seq_id])
            seq.num_computed_tokens += item.num_new_tokens - len(item.draft)
            if item.draft_catch_up is not None:
                seq.num_draft_computed = item.draft_catch_up[1]
            self.kv.cache_computed_blocks(seq, self._cacheable(seq))
            for child in item.forks:  # share the prompt's blocks from now on
                child.num_computed_tokens = seq.num_computed_tokens
                child.num_draft_computed = seq.num_draft_computed
                child.status = SequenceStatus.RUNNING
                self.kv.share_blocks(child, seq)
                seq.request.seqs.append(child)
                self.running.append(child)
            if samples:
                seq.request.forked = True
        now = time.time()
        touched: dict[str, Request] = {}
        drafts = {item.seq.seq_id: result.drafts.get(item.seq.seq_id, item.draft)
                  for item in sched.scheduled if item.draft}
        if drafts:
            self.spec_stats.num_steps += 1
        for seq, token, logprobs in zip(result.sampled, result.token_ids, result.logprobs):
            req = seq.request
            if seq.is_finished or req.request_id not in self.requests:
                # Its request failed earlier in this loop (a sibling's token),
                # or was aborted while its batch was in flight (with the
                # forks the batch made, which never joined it).
                continue
            error = result.errors.get(seq.seq_id)
            if error is None:
                try:
                    if seq.seq_id in drafts:
                        self._append_verified(seq, drafts[seq.seq_id], result.verdicts[seq.seq_id],
                                              now)
                    elif req.params.beam_search is not None:
                        self.detokenizer.decode_logprobs(logprobs)
                        seq.candidates = logprobs
                    else:
                        self._append_token(seq, token, logprobs, now)
                except Exception as exc:  # noqa: BLE001 - detokenizing, stop checks: its own
                    error = _describe("handling its sampled token", exc)
            else:
                error = f"sampling failed: {error}"
            if error is not None:
                self.fail_request(req, error)
                touched.pop(req.request_id, None)
                continue
            touched[req.request_id] = req
        for req in [r for r in touched.values() if r.params.beam_search is not None]:
            try:
                if all(s.candidates is not None for s in req.seqs):
                    self._advance_beams(req, now)
            except Exception as exc:  # noqa: BLE001 - forking, freeing: this request's fault alone
                self.fail_request(req, _describe("advancing its beams", exc))
                del touched[req.request_id]
                continue
            if not req.finished:  # its hypotheses are ranked at the end: one output then
                del touched[req.request_id]
        return [self._output(req) for req in touched.values()] + self.take_failed()

    def _advance_beams(self, req: Request, now: float) -> None:
        """Every live beam of ``req`` has proposed: the best proposals go on
        (``beam_search.select``), each in the beam it extends or, for a beam
        chosen again, in a fork of it that shares its blocks; the beams not
        chosen are freed. ``req.seqs`` become the new beams, best first."""
        params = req.params.beam_search
        chosen, ended = beam_search.select(req.seqs, params, req.eos_token_ids)
        req.completed_beams += ended
        beams, kept = [], set()
        for choice in chosen:  # all forks first: each copies its parent's tokens as they are
            parent = choice.parent
            beams.append(self._fork_beam(parent) if parent.seq_id in kept else parent)
            kept.add(parent.seq_id)
        for seq in req.seqs:
            if seq.seq_id not in kept:
                seq.status = SequenceStatus.FINISHED_STOPPED
                self._remove(seq)
        req.seqs = beams
        if not beams:  # every proposal was EOS: only the ended hypotheses are left
            return self._end_beams(req, SequenceStatus.FINISHED_STOPPED, now)
        for index, (seq, choice) in enumerate(zip(beams, chosen)):
            seq.index = index
            seq.token_ids.append(choice.token)
            seq.logprobs.append(choice.parent.candidates)
            seq.cumulative_logprob = choice.cumulative_logprob
            self.num_generation_tokens += 1
        for seq in beams:
            seq.candidates = None
        if beams[0].num_output_tokens == 1:
            req.metrics.first_token_time = now
            self.num_prompt_tokens += beams[0].num_prompt_tokens
        req.metrics.last_token_time = now
        if length_stop(beams[0], self.max_model_len) is not None:
            self._end_beams(req, SequenceStatus.FINISHED_LENGTH, now)

    def _fork_beam(self, parent: Sequence) -> Sequence:
        """A beam's second (third, ...) continuation: a fork sharing its blocks,
        running or waiting where its parent is."""
        child = parent.fork(parent.index)
        self.kv.share_blocks(child, parent)
        if parent.status is SequenceStatus.RUNNING:
            self.running.append(child)
        else:  # preempted while it waited for its siblings: recomputed with its parent
            self.waiting.insert(self.waiting.index(parent) + 1, child)
        return child

    def _end_beams(self, req: Request, status: SequenceStatus, now: float) -> None:
        for seq in req.seqs:
            seq.status = status
            self._remove(seq)
        req.metrics.finished_time = now
        self.requests.pop(req.request_id, None)
        self.suspects.discard(req.request_id)

    def _append_token(self, seq: Sequence, token: int, logprobs: LogprobsDict | None,
                      now: float) -> None:
        req = seq.request
        seq.token_ids.append(token)
        self.num_generation_tokens += 1
        if seq.num_output_tokens == 1 and seq.index == 0:
            req.metrics.first_token_time = now
            self.num_prompt_tokens += seq.num_prompt_tokens
        req.metrics.last_token_time = now
        if logprobs is not None:
            self.detokenizer.decode_logprobs(logprobs)
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        stop = token_stop(seq, token)
        if seq.matcher is not None:
            if not seq.matcher.accept_token(token):
                raise ValueError(f"token {token} does not fit the request's grammar")
            if seq.matcher.is_terminated():  # the grammar's end: its stop token
                stop = stop or (SequenceStatus.FINISHED_STOPPED, None)
        if stop is None:  # the stop token's own text is never shown
            stop = text_stop(seq, self.detokenizer.step(seq))
        if stop is not None:
            seq.status, seq.stop_reason = stop
        elif (status := length_stop(seq, self.max_model_len)) is not None:
            seq.status = status
        if seq.is_finished:
            self._remove(seq)
            if req.finished:
                req.metrics.finished_time = now
                self.requests.pop(req.request_id, None)
                self.suspects.discard(req.request_id)

    def _append_verified(self, seq: Sequence, draft: list[int], verdict, now: float) -> None:
        """A speculating sequence's step: the drafts it keeps and the token
        after them, appended one by one with every stop check (nothing past a
        stop is kept); each kept draft's K/V was computed in the step. Then
        the lookahead blocks past the computed tokens go back to the pool.

        A draft model computed its own K/V for the last token and every draft
        but the last (the inputs of its passes): it has those of the tokens
        kept, but for a last draft that was kept."""
        accepted, alternatives, logprobs = verdict
        kept = accepted_tokens(draft, accepted, alternatives)
        drafted_to = seq.num_draft_computed + len(draft) - 1
        stats = self.spec_stats
        stats.num_proposals += 1
        stats.num_draft_tokens += len(draft)
        stats.num_accepted_tokens += len(kept) - 1
        for i, token in enumerate(kept):
            if i:
                seq.num_computed_tokens += 1  # the previous token (a kept draft) was computed
            self._append_token(seq, token, logprobs[i], now)
            stats.num_emitted_tokens += 1
            if seq.is_finished:
                return
        seq.num_draft_computed = min(seq.num_computed_tokens, drafted_to)
        self.kv.cache_computed_blocks(seq, self._cacheable(seq))
        self.kv.trim(seq)

    def _add_prompt_logprobs(self, seq: Sequence, entries: list[LogprobsDict]) -> None:
        """Entries for the prompt positions after those computed so far; a
        chunk recomputed after preemption adds nothing twice."""
        have = len(seq.request.prompt_logprobs)
        start = seq.num_computed_tokens + 1  # the position the first entry scores
        for i, entry in enumerate(entries):
            if start + i == have and start + i < seq.num_prompt_tokens:
                self.detokenizer.decode_logprobs(entry)
                seq.request.prompt_logprobs.append(entry)
                have += 1

    def _output(self, req: Request) -> RequestOutput:
        if req.params.beam_search is not None:
            return beam_search.beam_output(req, self.detokenizer.tokenizer)
        ordered = sorted(req.seqs, key=lambda s: s.index)
        return req.output([visible_text(s) for s in ordered])


def _describe(what: str, exc: BaseException) -> str:
    return f"{what} failed: {type(exc).__name__}: {exc}"


class StepBudget:
    """How many tokens a step may carry while requests are decoding, so that
    a step (the time between two of a streaming request's tokens) takes about
    ``target_s``: a prefill chunk that takes seconds would freeze every
    stream.

    A step's time is about affine in its tokens: a fixed part (reading every
    weight once, the step's own overhead) plus a cost per token. The two are
    fitted by least squares to the last ``window`` steps, and the budget is
    what fits in the target: ``(target - fixed) / per_token``. Every step
    teaches it, prefill-only ones too, so the first step with decodes is
    already sized. A window whose steps are all about the same size (decode
    steps only) cannot tell the two parts apart and keeps the last fit: a
    decode step of 4 tokens that took 50 ms, read through the origin, would
    say only 64 tokens fit in 800 ms when its time is almost all fixed cost.
    Until a fit exists the largest step seen is read through the origin,
    which overrates the cost per token and errs on the short side.

    The target is an upper bound; with ``n`` requests decoding, a step is
    also kept within ``pace`` times what a decode-only step of those ``n``
    would take (``fixed + per_token * n``), so that a stream's stall stays
    in proportion to its usual pace; at saturation, where a decode step of
    many streams is long, the target alone would let a step take several
    times that. Either way a step may carry its decodes and a prompt chunk
    of ``min_prefill`` tokens, as long as they fit the target: smaller
    chunks would spend much of each step on its fixed part and split a
    prompt over several steps, each adding to its time to first token (with
    SmolLM2 on two CPU cores, 128-token chunks at 0.5 requests/s raised the
    TTFT p99 by about a third and did not lower the inter-token p99). That
    chunk stalls every decoding stream, so beyond ``shared_by`` streams it
    shrinks in proportion (``min_prefill * shared_by / n`` tokens, never
    below a quarter of ``min_prefill``), and at saturation the pace bound
    sizes the steps. On those two cores, with 64 streams arriving at once, a
    fixed floor of 257 tokens in all made the steps with a prompt chunk take
    about 260-520 ms; with the shrinking chunk they took 130-270 ms (three
    runs each), for a TTFT p99 of 16-18 s against 12-15 s and about the same
    throughput. With fewer streams (up to 8) nothing changes."""

    PACE = 2.0
    MIN_PREFILL = 256
    SHARED_BY = 8

    def __init__(self, target_s: float, max_tokens: int, min_tokens: int = 16,
                 window: int = 64, pace: float = PACE, min_prefill: int = MIN_PREFILL,
                 shared_by: int = SHARED_BY) -> None:
        self.target_s = target_s
        self.max_tokens = max_tokens
        self.min_tokens = min(min_tokens, max_tokens)
        self.pace, self.min_prefill, self.shared_by = pace, min_prefill, shared_by
        self.tokens = max_tokens  # what fits in the target
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)
        self.fixed_s: float | None = None  # the last fit: seconds a step costs ...
        self.per_token_s: float | None = None  # ... plus these per token

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        self.steps.append((num_tokens, seconds))
        self._fit()
        fixed, per_token = self._line()
        self.tokens = self._clamp((self.target_s - fixed) / per_token)

    def tokens_for(self, num_decodes: int) -> int:
        """The tokens a step with ``num_decodes`` decoding requests may carry."""
        if not self.steps:
            return self.max_tokens
        fixed, per_token = self._line()
        paced_s = min(self.target_s, self.pace * (fixed + per_token * num_decodes))
        floor = min(max(num_decodes, 1) + self.prompt_chunk(num_decodes), self.tokens)
        return self._clamp(max((paced_s - fixed) / per_token, floor))

    def prompt_chunk(self, num_decodes: int) -> int:
        """The prompt tokens a step beside ``num_decodes`` decodes may always
        carry (within the target)."""
        if num_decodes <= self.shared_by:
            return self.min_prefill
        return max(self.min_prefill * self.shared_by // num_decodes, self.min_prefill // 4)

    def _clamp(self, tokens: float) -> int:
        return int(min(max(tokens, self.min_tokens), self.max_tokens))

    def _line(self) -> tuple[float, float]:
        """(fixed, per_token): the last fit, or before one the largest step
        through the origin."""
        if self.per_token_s is None:
            n, t = max(self.steps)
            return 0.0, t / n
        return self.fixed_s, self.per_token_s

    def _fit(self) -> None:
        ns = [n for n, _ in self.steps]
        lo, hi = min(ns), max(ns)
        if hi < max(2 * lo, lo + 32):
            return  # steps of one size: keep the last fit
        k = len(self.steps)
        mean_n = sum(ns) / k
        mean_t = sum(t for _, t in self.steps) / k
        var = sum((n - mean_n) ** 2 for n in ns)
        cov = sum((n - mean_n) * (t - mean_t) for n, t in self.steps)
        per_token = cov / var
        if per_token <= 0:
            return  # noise swamped the slope; keep the last fit
        fixed = mean_t - per_token * mean_n
        if fixed < 0:  # a line through the origin fits better
            fixed, per_token = 0.0, sum(n * t for n, t in self.steps) / sum(n * n for n in ns)
        self.fixed_s, self.per_token_s = fixed, per_token
