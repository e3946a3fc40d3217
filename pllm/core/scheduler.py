"""Continuous batching over a token budget.

Each step: running sequences first (in arrival order), each asking for the
rest of its tokens (one, for a decode; a chunk, for a long prefill); then
waiting sequences, first come first served, while budget, sequence slots and
blocks last. When blocks run out for a running sequence, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of
the waiting queue to be recomputed later (its tokens are kept, so the result
is unchanged).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pllm.core.config import SchedulerConfig
from pllm.core.kv_cache.manager import KVCacheManager
from pllm.core.request import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last known token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling joins its parent in the running set."""
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[int] = set()

        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
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

        if not out.preempted:
            self._admit_waiting(out, budget)
        out.block_copies = self.kv.take_pending_copies()
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = self.kv.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_computed = seq.num_computed_tokens + len(cached) * self.kv.block_size
            num_new = seq.num_tokens - num_computed
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(seq, num_new, cached):
                break
            if seq.status is SequenceStatus.WAITING and seq.request.metrics.first_scheduled_time is None:
                self.kv.pool.record_query(seq.num_tokens, len(cached) * self.kv.block_size)
                seq.request.num_cached_tokens = len(cached) * self.kv.block_size
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _pick_victim(self, scheduled_ids: set[int]) -> Sequence:
        # The newest running sequence not already in this step's batch; if all
        # are scheduled, the newest of all (its slot is then given back).
        for seq in reversed(self.running):
            if seq.seq_id not in scheduled_ids:
                return seq
        return self.running[-1]

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
