"""Turns a scheduled batch into flat tensors plus AttentionMetadata, runs the
model, and returns logits only for the rows that are needed."""

from __future__ import annotations

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

    def build(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """``batch`` must list decodes (one new token) first."""
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
        dev = self.device
        metadata = AttentionMetadata(
            num_seqs=len(batch), num_tokens=len(input_ids), num_decodes=num_decodes,
            max_query_len=max(b.num_new_tokens for b in batch), max_seq_len=max(seq_lens),
            block_size=bs,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=tables.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, self.backend.prepare_metadata(metadata)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if sched.block_copies:
            self.backend.copy_blocks(self.kv_caches, sched.block_copies)
        batch = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)  # decodes first
        ids, pos, metadata = self.build(batch)
        if self.decode_runner is not None and self.decode_runner.accepts(metadata):
            hidden = self.decode_runner.run(ids, pos, metadata)
        else:
            hidden = self.model(ids, pos, ForwardContext(self.backend, metadata, self.kv_caches))

        out = RunnerOutput()
        rows: list[int] = []
        start = 0
        prompt_spans: list[tuple[int, int, int]] = []  # seq_id, first row, last row
        for item in batch:
            end = start + item.num_new_tokens
            if item.samples:
                out.sampling.append(item)
                rows.append(end - 1)
            seq = item.seq
            if seq.request.params.prompt_logprobs is not None and seq.is_prefilling_prompt:
                prompt_spans.append((seq.seq_id, start, end))
            start = end
        if rows:
            out.logits = self.model.compute_logits(hidden[rows])
        for seq_id, lo, hi in prompt_spans:
            out.prompt_logits[seq_id] = self.model.compute_logits(hidden[lo:hi])
        return out
