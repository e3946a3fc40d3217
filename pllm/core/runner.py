"""Turns a scheduled batch into flat tensors plus AttentionMetadata, runs the
model, and returns logits only for the rows that are needed.

On a platform with static shapes (capabilities' ``token_buckets`` and
``seq_buckets``) every tensor that reaches the device has a bucketed shape,
so that one compiled program serves every step of a bucket (XLA):

    3 sequences, 21 tokens; buckets 32 tokens; max_num_seqs 4; width max_model_len/bs
    query_start_loc [0, 1, 2, 21] -> [0, 1, 2, 21, 21]  (sequences to max_num_seqs' bucket)
    input_ids, positions   + 11 zeros; slot_mapping + 11 x -1 (padding: no live block)
    block_tables           rows padded with zeros, columns to the full width
    sampled rows           [0, 1, 20] -> [0, 1, 20, 20] (to a sequence bucket; cut on the host)

The sequence dimension of the attention metadata is always the bucket of
``max_num_seqs``, so the forward pass compiles once per token bucket; the LM
head and the sampler compile once per (token, row) and row bucket. The
platform's ``graph_break`` cuts the work into those three programs, and
:meth:`ModelRunner.warm_up` compiles them all before the first request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pllm.core.config import EngineConfig
from pllm.core.interfaces import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    Model,
    PlatformCapabilities,
)
from pllm.core.outputs import LogprobsDict
from pllm.core.request import Sequence
from pllm.core.sampler import SamplingMetadata, sample, top_logprobs, verify
from pllm.core.scheduler import ScheduledSeq, SchedulerOutput
from pllm.core.structured import constrain


@dataclass
class RunnerOutput:
    """What rank 0 sampled: one token per sampling row (a sequence, or a fork
    made this step), and the logprobs asked for."""

    sampled: list[Sequence] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsDict | None] = field(default_factory=list)
    # seq_id -> entries scoring the prompt tokens after the computed chunk's
    # positions (prompt_logprobs), in order.
    prompt_logprobs: dict[int, list[LogprobsDict]] = field(default_factory=dict)
    # seq_id -> why its row could not be sampled (its token id is then meaningless).
    errors: dict[int, str] = field(default_factory=dict)
    # Speculative decoding: seq_id -> the verifier's verdict on its positions
    # (one per draft, whether accepted; one token per position, what it
    # gives when its draft is rejected or, on the last, the bonus; one
    # logprobs entry per position, of the token it emits).
    verdicts: dict[int, tuple[list[bool], list[int], list[LogprobsDict | None]]] = field(
        default_factory=dict)
    # seq_id -> the drafts a draft model proposed in the step (the
    # scheduled placeholders' tokens).
    drafts: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class StepInputs:
    """One step's flat batch on the host, decodes first: what the runner turns
    into device tensors and metadata, and what rank 0 sends to the other
    tensor-parallel ranks (a few small tensors, no sequence objects)."""

    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    query_start_loc: list[int]
    seq_lens: list[int]
    num_decodes: int
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Rows whose logits are sampled, and (seq_id, lo, hi) row spans that need
    # the logits of every prompt position (prompt_logprobs), in batch order.
    sample_rows: list[int] = field(default_factory=list)
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class PreparedStep:
    """A step between its inputs and its sampling (``ModelRunner.begin``):
    under pipeline parallelism rank 0 holds one per batch in flight."""

    batch: list[ScheduledSeq]
    inputs: StepInputs
    drafts: dict[int, list[int]] = field(default_factory=dict)
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def autograd_off(caps: PlatformCapabilities):
    """``torch.inference_mode``, or where the platform's tensors do not
    support it (capabilities' ``inference_mode`` False: XLA) ``no_grad`` with
    inference mode switched off, even inside an inference-mode caller."""
    if caps.inference_mode:
        with torch.inference_mode():
            yield
    else:
        with torch.inference_mode(False), torch.no_grad():
            yield


def _autograd_off(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with autograd_off(self.caps):
            return method(self, *args, **kwargs)
    return wrapper


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``size`` (``size`` itself past the largest)."""
    return next((b for b in buckets if b >= size), size)


class ModelRunner:
    def __init__(self, model: Model, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 config: EngineConfig, device: torch.device, caps: PlatformCapabilities,
                 decode_runner=None, graph_break: Callable[[], None] | None = None) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = config.cache.block_size
        self.device = device
        self.config = config
        self.caps = caps
        # Static shapes: pad to these (empty: no padding).
        self.token_buckets, self.seq_buckets = caps.token_buckets, caps.seq_buckets
        self.max_blocks = -(-config.model.max_model_len // self.block_size)
        self.max_seqs = bucket(config.scheduler.max_num_seqs, self.seq_buckets)
        # Where a lazy-tensor platform cuts the step into programs (None: nowhere).
        self.graph_break = graph_break or (lambda: None)
        # Serves decode-only steps from persistent buffers (graph replay); None: eager.
        self.decode_runner = decode_runner
        # Called with each step's inputs before the forward (tensor parallelism:
        # hands them to the other ranks); None: one rank.
        self.on_step: Callable[[StepInputs], None] | None = None
        # Speculative decoding's draft model (pllm.core.draft.DraftRunner), and
        # what hands its plan to the other ranks; None: no draft model.
        self.drafter = None
        self.on_draft: Callable[[object], None] | None = None

    def prepare(self, sched: SchedulerOutput) -> tuple[list[ScheduledSeq], StepInputs]:
        """The step's sequences in batch order (decodes, one new token each,
        first) and their flat inputs.

        A speculating sequence (drafts after its last token) is laid out as
        decode rows, one per token, each attending to the cache up to its own
        position through the sequence's block table: every backend writes a
        step's K/V before its attention reads, so each row sees the rows
        before it, and the step stays decode-only (the CPU's one-call decode
        layers, CUDA graphs)."""
        batch = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1 and not s.draft)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens = []
        row_tables: list[list[int]] = []
        spans = []  # (item, its first token, one past its last)
        for item in batch:
            seq, lo = item.seq, item.seq.num_computed_tokens
            hi = lo + item.num_new_tokens
            first = starts[-1]
            input_ids.extend(seq.token_ids[lo:hi - len(item.draft)])
            input_ids.extend(item.draft)
            positions.extend(range(lo, hi))
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(lo, hi))
            rows = range(lo + 1, hi + 1) if item.draft else [hi]  # each row's sequence length
            for length in rows:
                starts.append(starts[-1] + (1 if item.draft else item.num_new_tokens))
                seq_lens.append(length)
                row_tables.append(table)
            spans.append((item, first, starts[-1]))
        width = max(len(table) for table in row_tables)
        if self.token_buckets:
            width = max(width, self.max_blocks)
        tables = torch.zeros(len(row_tables), width, dtype=torch.int32)
        for i, table in enumerate(row_tables):
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        num_decodes = 0
        while num_decodes < len(seq_lens) and starts[num_decodes + 1] - starts[num_decodes] == 1:
            num_decodes += 1
        sample_rows, prompt_spans = [], []
        for item, lo, hi in spans:
            if item.samples:  # a speculating sequence: its last token's and every draft's
                sample_rows.extend(range(hi - 1 - len(item.draft), hi))
            if item.seq.request.params.prompt_logprobs is not None and item.seq.is_prefilling_prompt:
                prompt_spans.append((item.seq.seq_id, lo, hi))
        if self.token_buckets:
            tables = self._pad(input_ids, positions, slots, starts, seq_lens, tables)
            sample_rows = self.pad_rows(sample_rows)
        return batch, StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=tables, query_start_loc=starts, seq_lens=seq_lens,
            num_decodes=num_decodes, block_copies=list(sched.block_copies),
            sample_rows=sample_rows, prompt_spans=prompt_spans,
        )

    def _pad(self, input_ids: list[int], positions: list[int], slots: list[int], starts: list[int],
             seq_lens: list[int], tables: torch.Tensor) -> torch.Tensor:
        """Pad the flat batch (in place) up to the platform's buckets; returns
        the padded block tables. See the module docstring."""
        pad = bucket(starts[-1], self.token_buckets) - starts[-1]
        input_ids += [0] * pad
        positions += [0] * pad
        slots += [-1] * pad
        extra = max(self.max_seqs, len(seq_lens)) - len(seq_lens)
        starts += [starts[-1]] * extra
        seq_lens += [0] * extra
        return torch.cat([tables, tables.new_zeros(extra, tables.shape[1])])

    def pad_rows(self, rows: list[int]) -> list[int]:
        """``rows`` repeated at the end up to a sequence bucket (static shapes)."""
        if not self.token_buckets or not rows:
            return rows
        return rows + [rows[-1]] * (bucket(len(rows), self.seq_buckets) - len(rows))

    def build(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Device tensors and attention metadata for ``inputs``."""
        dev = self.device
        starts, seq_lens = inputs.query_start_loc, inputs.seq_lens
        metadata = AttentionMetadata(
            num_seqs=len(seq_lens), num_tokens=len(inputs.input_ids), num_decodes=inputs.num_decodes,
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens),
            block_size=self.block_size,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=inputs.block_tables.to(dev),
            slot_mapping=inputs.slot_mapping.to(dev),
            query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
        )
        ids, pos = inputs.input_ids.to(dev), inputs.positions.to(dev)
        return ids, pos, self.backend.prepare_metadata(metadata)

    @_autograd_off
    def forward(self, inputs: StepInputs, intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of every token of the step (every rank runs this).
        A pipeline stage after the first starts from ``intermediate``, the
        residual stream the stage before it sent."""
        if inputs.block_copies:
            self.backend.copy_blocks(self.kv_caches, inputs.block_copies)
            self.graph_break()
        ids, pos, metadata = self.build(inputs)
        if self.decode_runner is not None and self.decode_runner.accepts(metadata):
            return self.decode_runner.run(ids, pos, metadata)
        ctx = ForwardContext(self.backend, metadata, self.kv_caches)
        hidden = (self.model(ids, pos, ctx) if intermediate is None
                  else self.model(ids, pos, ctx, intermediate.to(self.device)))
        self.graph_break()
        return hidden

    @_autograd_off
    def logits(self, hidden: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The sampled rows' logits, and each prompt span's by seq_id (every
        rank runs this: under tensor parallelism the LM head is split by vocabulary)."""
        sampled = None
        if inputs.sample_rows:
            rows = torch.tensor(inputs.sample_rows, dtype=torch.long).to(hidden.device)
            sampled = self.model.compute_logits(hidden.index_select(0, rows))
        spans = {seq_id: self.model.compute_logits(hidden[lo:hi])
                 for seq_id, lo, hi in inputs.prompt_spans}
        self.graph_break()
        return sampled, spans

    @_autograd_off
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Rank 0's step: forward, LM head, then sampling on the device; only
        token ids (and requested logprobs) come back to the host. With a draft
        model, it proposes the step's drafts first."""
        step = self.begin(sched)
        return self.finish(step, *self.logits(self.forward(step.inputs), step.inputs))

    @_autograd_off
    def begin(self, sched: SchedulerOutput) -> PreparedStep:
        """The step's drafts (a draft model's), its inputs, handed to the
        other ranks (``on_step``): all that comes before the forward."""
        drafts: dict[int, list[int]] = {}
        draft_probs: dict[int, torch.Tensor] = {}
        plan = self.drafter.plan(sched) if self.drafter is not None else None
        if plan is not None:
            if self.on_draft is not None:
                self.on_draft(plan)
            drafts, draft_probs = self.drafter.propose(plan)
            sched = dataclasses.replace(sched, scheduled=[
                dataclasses.replace(item, draft=drafts[item.seq.seq_id])
                if item.seq.seq_id in drafts else item for item in sched.scheduled])
        batch, inputs = self.prepare(sched)
        if self.on_step is not None:
            self.on_step(inputs)
        return PreparedStep(batch, inputs, drafts, draft_probs)

    @_autograd_off
    def finish(self, step: PreparedStep, logits: torch.Tensor | None,
               prompt_logits: dict[int, torch.Tensor]) -> RunnerOutput:
        """Sampling (and verifying drafts) from the step's logits: what
        comes after the LM head, on rank 0."""
        batch, drafts, draft_probs = step.batch, step.drafts, step.draft_probs
        out = RunnerOutput(drafts=drafts)
        rows: list[int] = []
        speculating: list[tuple[ScheduledSeq, int]] = []  # (item, its first logits row)
        row = 0
        for item in batch:
            if not item.samples:
                continue
            if item.draft:
                speculating.append((item, row))
                row += 1 + len(item.draft)
                continue
            family = [item.seq, *item.forks]
            out.sampled += family
            rows += [row] * len(family)
            row += 1
        if speculating:
            self._verify(logits, speculating, out, draft_probs)
        if out.sampled:
            identity = rows == list(range(len(rows)))  # no forks: the logits rows are the sampling rows
            rows = self.pad_rows(rows)  # static shapes: sample a bucket of rows, keep the real ones
            if not identity or len(rows) != logits.shape[0]:
                logits = logits.index_select(0, torch.tensor(rows, dtype=torch.long).to(logits.device))
            logits = constrain(logits, out.sampled)  # structured outputs' grammars
            try:
                md = SamplingMetadata.build(out.sampled, logits.shape[1], logits.device,
                                            num_rows=len(rows), static=bool(self.token_buckets))
                result = sample(logits, md)
                num = len(out.sampled)
                out.token_ids, out.logprobs = result.token_ids[:num], result.logprobs[:num]
            except Exception:  # noqa: BLE001 - find the rows at fault; the others keep their step
                self._sample_rows_apart(logits, out)
        for item, _ in speculating:  # their tokens are in out.verdicts
            out.sampled.append(item.seq)
            out.token_ids.append(-1)
            out.logprobs.append(None)
        for item in batch:
            if item.seq.seq_id in prompt_logits:
                out.prompt_logprobs[item.seq.seq_id] = self._prompt_logprobs(
                    item, prompt_logits[item.seq.seq_id])
        return out

    def _verify(self, logits: torch.Tensor, speculating: list[tuple[ScheduledSeq, int]],
                out: RunnerOutput, draft_probs: dict[int, torch.Tensor]) -> None:
        """Check the speculating sequences' drafts (``sampler.verify``), all in
        one batch, into ``out.verdicts``; when the batch raises, each sequence
        alone, so that only those at fault (``out.errors``) lose the step.
        ``draft_probs``: seq_id -> the distribution each of its drafts was
        drawn from (a draft model's sampled drafts; others are point masses)."""
        seqs, drafts, ahead, spec_rows, widths = [], [], [], [], []
        for item, first in speculating:
            width = 1 + len(item.draft)
            seqs += [item.seq] * width
            drafts += item.draft + [-1]
            ahead += [item.draft[:j] for j in range(width)]  # the drafts before each row's position
            spec_rows += range(first, first + width)
            widths.append(width)
        spec_logits = logits.index_select(
            0, torch.tensor(spec_rows, dtype=torch.long).to(logits.device))
        vocab = logits.shape[1]
        q = None
        if draft_probs:  # one row per position; point masses (one-hot) where no q was drawn
            q = torch.zeros(len(drafts), vocab, device=logits.device)
            offset = 0
            for (item, _), width in zip(speculating, widths):
                rows = draft_probs.get(item.seq.seq_id)
                if rows is not None:
                    q[offset: offset + width - 1] = rows[:, :vocab]
                else:
                    q[torch.arange(offset, offset + width - 1), item.draft] = 1.0
                offset += width
        try:
            md = SamplingMetadata.build(seqs, vocab, logits.device, ahead=ahead)
            result = verify(spec_logits, md, drafts, q)
            parts = [result.accepted, result.token_ids, result.logprobs]
            offset = 0
            for (item, _), width in zip(speculating, widths):
                accepted, tokens, logprobs = (p[offset: offset + width] for p in parts)
                out.verdicts[item.seq.seq_id] = (accepted[:-1], tokens, logprobs)
                offset += width
        except Exception:  # noqa: BLE001 - find the sequences at fault
            offset = 0
            for (item, _), width in zip(speculating, widths):
                try:
                    md = SamplingMetadata.build([item.seq] * width, vocab, logits.device,
                                                ahead=[item.draft[:j] for j in range(width)])
                    one = verify(spec_logits[offset: offset + width], md, item.draft + [-1],
                                 None if q is None else q[offset: offset + width])
                    out.verdicts[item.seq.seq_id] = (one.accepted[:-1], one.token_ids, one.logprobs)
                except Exception as exc:  # noqa: BLE001 - this sequence's own failure
                    out.errors[item.seq.seq_id] = f"{type(exc).__name__}: {exc}"
                offset += width

    def _sample_rows_apart(self, logits: torch.Tensor, out: RunnerOutput) -> None:
        """The batch's sampling raised: sample each row alone, so that only
        the rows that fail on their own (recorded in ``out.errors``) lose the step."""
        out.token_ids, out.logprobs = [], []
        for row, seq in enumerate(out.sampled):
            try:
                md = SamplingMetadata.build([seq], logits.shape[1], logits.device)
                result = sample(logits[row: row + 1], md)
                token, logprobs = result.token_ids[0], result.logprobs[0]
            except Exception as exc:  # noqa: BLE001 - this row's own failure
                out.errors[seq.seq_id] = f"{type(exc).__name__}: {exc}"
                token, logprobs = -1, None
            out.token_ids.append(token)
            out.logprobs.append(logprobs)

    @staticmethod
    def _prompt_logprobs(item: ScheduledSeq, logits: torch.Tensor) -> list[LogprobsDict]:
        """Row ``i`` of a prompt chunk scores the prompt token after it."""
        seq = item.seq
        start = seq.num_computed_tokens
        num = min(item.num_new_tokens, seq.num_prompt_tokens - start - 1)
        if num <= 0:
            return []
        nxt = torch.tensor(seq.token_ids[start + 1: start + 1 + num], device=logits.device)
        logp = logits[:num].float().log_softmax(-1)
        return top_logprobs(logp, nxt, [seq.request.params.prompt_logprobs] * num)

    @_autograd_off
    def warm_up(self, sample_on_this_rank: bool = True) -> list[tuple[str, float]]:
        """Static shapes: run every program a step can need once, so that
        serving compiles nothing: the forward pass per token bucket (up to
        ``max_num_batched_tokens``), the LM head per (token bucket, row
        bucket) and, on the rank that samples, the greedy, random and seeded
        sampler per row bucket (penalties, min_tokens bans, logprobs and
        n > 1 forks compile on first use). The dummy steps write only the padding slots.
        Returns (shape, seconds) per program, in order."""
        from tqdm.auto import tqdm

        sched = self.config.scheduler
        limit = bucket(sched.max_num_batched_tokens, self.token_buckets)
        token_sizes = [b for b in self.token_buckets if b <= limit]
        max_rows = min(sched.max_num_seqs, limit)
        timings: list[tuple[str, float]] = []
        work = [(t, sorted({bucket(r, self.seq_buckets) for r in range(1, min(t, max_rows) + 1)}))
                for t in token_sizes]
        bar = tqdm(total=sum(1 + len(rows) for _, rows in work), desc="compiling step shapes",
                   unit="program", disable=None)
        sampled_sizes: set[int] = set()
        for num_tokens, row_sizes in work:
            # One sequence of (at most a full context of) padding tokens.
            real = min(num_tokens, self.max_blocks * self.block_size)
            inputs = StepInputs(
                input_ids=torch.zeros(num_tokens, dtype=torch.long),
                positions=torch.arange(num_tokens, dtype=torch.long).clamp(max=real - 1),
                slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64),
                block_tables=torch.zeros(self.max_seqs, self.max_blocks, dtype=torch.int32),
                query_start_loc=[0] + [real] * self.max_seqs,
                seq_lens=[real] + [0] * (self.max_seqs - 1), num_decodes=0)
            t0 = time.perf_counter()
            hidden = self.forward(inputs)
            timings.append((f"forward tokens={num_tokens}", time.perf_counter() - t0))
            bar.update()
            for num_rows in row_sizes:
                t0 = time.perf_counter()
                inputs.sample_rows = list(range(num_rows))
                logits, _ = self.logits(hidden, inputs)
                name = f"lm_head tokens={num_tokens} rows={num_rows}"
                if sample_on_this_rank and num_rows not in sampled_sizes:
                    sampled_sizes.add(num_rows)
                    for random, seeded in ((False, False), (True, False), (True, True)):
                        sample(logits, SamplingMetadata.dummy(num_rows, logits.shape[1],
                                                              logits.device, random=random,
                                                              seeded=seeded))
                    name += " + sampler"
                timings.append((name, time.perf_counter() - t0))
                bar.update()
        bar.close()
        return timings
