"""Pipeline parallelism: the layers split into stages, each stage a
tensor-parallel group of its own, its ranks ``stage * tp .. stage * tp + tp - 1``::

    -tp 2 -pp 2       stage 0: ranks 0, 1 (embedding, layers 0..n/2)
                      stage 1: ranks 2, 3 (layers n/2..n, norm, LM head)

Rank 0 schedules, prepares each step's inputs (which every rank receives
through its executor, as under tensor parallelism alone) and runs stage 0.
Each rank of a stage sends the residual stream after its layers to the rank
of the same tensor-parallel place in the next stage (point-to-point, on the
communicator of all ranks); the last stage runs the norm and the LM head,
and its first rank sends the logits back to rank 0, which samples (on a
group of those two ranks: see ``Worker``).

Rank 0 starts the next batch's stage 0 while later stages run the previous
ones (``LLMEngine`` keeps up to ``pipeline_parallel_size`` batches in
flight, no request in two of them): each stage works on a different batch
at once. Steps reach every stage in the order rank 0 started them, so a
send always meets the receive for the same step.
"""

from __future__ import annotations

from collections import deque

import torch

from pllm.core.interfaces import Communicator


class StageLinks:
    """One rank's point-to-point traffic under pipeline parallelism (see the
    module docstring). ``world``: the communicator of every rank, which
    carries the residual stream; ``logits``: the group of rank 0 and the last
    stage's first rank (None on other ranks), which carries the logits back."""

    def __init__(self, world: Communicator, logits: Communicator | None, rank: int,
                 tp_size: int, pp_size: int, hidden_size: int, vocab_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.world, self.logits, self.rank = world, logits, rank
        self.stage, self.tp_rank = divmod(rank, tp_size)
        self.tp_size, self.pp_size = tp_size, pp_size
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.dtype, self.device = dtype, device
        self.is_first, self.is_last = self.stage == 0, self.stage == pp_size - 1
        # Sends not yet known to have arrived, with their tensors (kept alive
        # until then); a rank never has more than a pipeline's depth of them.
        self._sending: deque = deque()

    def _send(self, comm: Communicator, tensor: torch.Tensor, dst: int) -> None:
        while len(self._sending) >= self.pp_size:
            self._sending.popleft()[0].wait()
        self._sending.append((comm.send(tensor, dst), tensor))

    def send_hidden(self, hidden: torch.Tensor) -> None:
        """The residual stream after this stage's layers, to the next stage."""
        self._send(self.world, hidden.contiguous(), self.rank + self.tp_size)

    def recv_hidden(self, num_tokens: int) -> torch.Tensor:
        """The previous stage's residual stream for a step of ``num_tokens``."""
        buf = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        return self.world.recv(buf, self.rank - self.tp_size)

    @staticmethod
    def logit_rows(num_sampled: int, prompt_spans: list[tuple[int, int, int]]) -> int:
        return num_sampled + sum(hi - lo for _, lo, hi in prompt_spans)

    def send_logits(self, sampled: torch.Tensor | None, spans: dict[int, torch.Tensor]) -> None:
        """The last stage's logits (its first rank's: every rank of the stage
        has them all after the vocabulary all-gather), to rank 0: the sampled
        rows, then each prompt span's, in the step's order."""
        if self.tp_rank != 0:
            return
        parts = ([sampled] if sampled is not None else []) + list(spans.values())
        if parts:  # in fp32, which holds any model dtype's logits exactly
            self._send(self.logits, torch.cat(parts).float().contiguous(), 0)

    def recv_logits(self, num_sampled: int, prompt_spans: list[tuple[int, int, int]]
                    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Rank 0: what ``send_logits`` sent for a step, as ``ModelRunner.logits`` returns it."""
        rows = self.logit_rows(num_sampled, prompt_spans)
        if rows == 0:
            return None, {}
        buf = torch.empty(rows, self.vocab_size, dtype=torch.float32, device=self.device)
        self.logits.recv(buf, 1)  # the last stage's first rank, in the logits group
        sampled = buf[:num_sampled] if num_sampled else None
        spans, row = {}, num_sampled
        for seq_id, lo, hi in prompt_spans:
            spans[seq_id] = buf[row: row + hi - lo]
            row += hi - lo
        return sampled, spans

    def drain(self) -> None:
        """Wait for every send to arrive (before the tensors may go)."""
        while self._sending:
            self._sending.popleft()[0].wait()


def check_pipeline(config, platform, hf_config) -> None:
    """Fail before any process starts when the pipeline cannot be built."""
    from pllm.models.parallel import layer_partition

    size = config.parallel.pipeline_parallel_size
    if size == 1:
        return
    if not platform.capabilities.pipeline_parallel:
        raise ValueError(
            f"pipeline_parallel_size={size}: pipeline parallelism is not supported on "
            f"{platform.name} (its capabilities do not declare pipeline_parallel: its "
            f"communicator has no point-to-point sends or subgroups)")
    if config.speculative is not None:
        raise ValueError("speculative decoding cannot run with pipeline parallelism yet: its "
                         "drafts are proposed and verified within one step on rank 0")
    layer_partition(hf_config.num_hidden_layers, size)
