"""Turns a scheduled batch into flat tensors plus AttentionMetadata, runs the
model, and returns logits only for the rows that are needed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata
from pllm.core.scheduler import ScheduledSeq, SchedulerOutput
from pllm.models.layers import ForwardContext


@dataclass
class RunnerOutput:
    # Sequences that sample this step, in batch order, and their logits rows.
    sampling: list[ScheduledSeq] = field(default_factory=list)
    logits: torch.Tensor | None = None
    # seq_id -> logits of every computed prompt position (for prompt_logprobs).
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)


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


class ModelRunner:
    def __init__(self, model, backend: AttentionBackend, kv_caches: list[torch.Tensor],
                 block_size: int, device: torch.device, decode_runner=None) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
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
        return batch, StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=tables, query_start_loc=starts, seq_lens=seq_lens,
            num_decodes=num_decodes, block_copies=list(sched.block_copies),
            sample_rows=sample_rows, prompt_spans=prompt_spans,
        )

    def build(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Device tensors and attention metadata for ``inputs``."""
        dev = self.device
        starts, seq_lens = inputs.query_start_loc, inputs.seq_lens
        metadata = AttentionMetadata(
            num_seqs=len(seq_lens), num_tokens=starts[-1], num_decodes=inputs.num_decodes,
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
        batch, inputs = self.prepare(sched)
        if self.on_step is not None:
            self.on_step(inputs)
        logits, prompt_logits = self.logits(self.forward(inputs), inputs)
        return RunnerOutput(sampling=[item for item in batch if item.samples], logits=logits,
                            prompt_logits=prompt_logits)
