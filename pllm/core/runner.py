"""Turns a scheduled batch into flat tensors plus AttentionMetadata, runs the
model, and returns logits only for the rows that are needed.

On a platform with static shapes (capabilities' ``token_buckets`` and
``seq_buckets``) the flat batch is padded before it goes to the device::

    3 sequences, 21 tokens; buckets 4 seqs / 32 tokens; width max_model_len/bs
    query_start_loc [0, 1, 2, 21] -> [0, 1, 2, 21, 21]  (one empty sequence)
    input_ids, positions   + 11 zeros; slot_mapping + 11 x -1 (no write)
    block_tables           rows padded with zeros, columns to the full width
"""

from __future__ import annotations

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
from pllm.core.sampler import SamplingMetadata, sample, top_logprobs
from pllm.core.scheduler import ScheduledSeq, SchedulerOutput


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


def bucket(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``size`` (``size`` itself past the largest)."""
    return next((b for b in buckets if b >= size), size)


class ModelRunner:
    def __init__(self, model: Model, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 config: EngineConfig, device: torch.device, caps: PlatformCapabilities,
                 decode_runner=None) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = config.cache.block_size
        self.device = device
        # Static shapes: pad to these (empty: no padding).
        self.token_buckets, self.seq_buckets = caps.token_buckets, caps.seq_buckets
        self.max_blocks = -(-config.model.max_model_len // self.block_size)
        # Serves decode-only steps from persistent buffers (graph replay); None: eager.
        self.decode_runner = decode_runner
        # Called with each step's inputs before the forward (tensor parallelism:
        # hands them to the other ranks); None: one rank.
        self.on_step: Callable[[StepInputs], None] | None = None

    def prepare(self, sched: SchedulerOutput) -> tuple[list[ScheduledSeq], StepInputs]:
        """The step's sequences in batch order (decodes, one new token each,
        first) and their flat inputs."""
        batch = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens = []
        for item in batch:
            seq, lo = item.seq, item.seq.num_computed_tokens
            hi = lo + item.num_new_tokens
            input_ids.extend(seq.token_ids[lo:hi])
            positions.extend(range(lo, hi))
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in range(lo, hi))
            starts.append(starts[-1] + item.num_new_tokens)
            seq_lens.append(hi)
        width = max(len(item.seq.block_ids) for item in batch)
        if self.token_buckets:
            width = max(width, self.max_blocks)
        tables = torch.zeros(len(batch), width, dtype=torch.int32)
        for i, item in enumerate(batch):
            tables[i, : len(item.seq.block_ids)] = torch.tensor(item.seq.block_ids, dtype=torch.int32)
        num_decodes = 0
        while num_decodes < len(batch) and batch[num_decodes].num_new_tokens == 1:
            num_decodes += 1
        sample_rows, prompt_spans = [], []
        for item, lo, hi in zip(batch, starts, starts[1:]):
            if item.samples:
                sample_rows.append(hi - 1)
            if item.seq.request.params.prompt_logprobs is not None and item.seq.is_prefilling_prompt:
                prompt_spans.append((item.seq.seq_id, lo, hi))
        if self.token_buckets:
            tables = self._pad(input_ids, positions, slots, starts, seq_lens, tables)
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
        extra = bucket(len(seq_lens), self.seq_buckets) - len(seq_lens)
        starts += [starts[-1]] * extra
        seq_lens += [0] * extra
        return torch.cat([tables, tables.new_zeros(extra, tables.shape[1])])

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

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states of every token of the step (every rank runs this)."""
        if inputs.block_copies:
            self.backend.copy_blocks(self.kv_caches, inputs.block_copies)
        ids, pos, metadata = self.build(inputs)
        if self.decode_runner is not None and self.decode_runner.accepts(metadata):
            return self.decode_runner.run(ids, pos, metadata)
        return self.model(ids, pos, ForwardContext(self.backend, metadata, self.kv_caches))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """The sampled rows' logits, and each prompt span's by seq_id (every
        rank runs this: under tensor parallelism the LM head is split by vocabulary)."""
        sampled = self.model.compute_logits(hidden[inputs.sample_rows]) if inputs.sample_rows else None
        return sampled, {seq_id: self.model.compute_logits(hidden[lo:hi])
                         for seq_id, lo, hi in inputs.prompt_spans}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Rank 0's step: forward, LM head, then sampling on the device; only
        token ids (and requested logprobs) come back to the host."""
        batch, inputs = self.prepare(sched)
        if self.on_step is not None:
            self.on_step(inputs)
        logits, prompt_logits = self.logits(self.forward(inputs), inputs)
        out = RunnerOutput()
        rows: list[int] = []
        for row, item in enumerate(i for i in batch if i.samples):
            family = [item.seq, *item.forks]
            out.sampled += family
            rows += [row] * len(family)
        if out.sampled:
            if len(rows) != logits.shape[0]:
                logits = logits[torch.tensor(rows, device=logits.device)]
            md = SamplingMetadata.build(out.sampled, logits.shape[1], logits.device)
            result = sample(logits, md)
            out.token_ids, out.logprobs = result.token_ids, result.logprobs
        for item in batch:
            if item.seq.seq_id in prompt_logits:
                out.prompt_logprobs[item.seq.seq_id] = self._prompt_logprobs(
                    item, prompt_logits[item.seq.seq_id])
        return out

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
