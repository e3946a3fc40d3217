"""Collectives through torch-xla: ``torch.distributed`` with the ``xla``
process-group backend, whose all-reduce and all-gather lower to XLA
collectives inside the step's program (on TPUs over ICI)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pllm.platforms.common.communicator import TorchDistributedCommunicator


class XLACommunicator(TorchDistributedCommunicator):
    backend = "xla"

    def _setup_device(self) -> None:
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the "xla" backend)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        moved = tensor.movedim(dim, 0).contiguous()
        out = moved.new_empty((self.world_size * moved.shape[0], *moved.shape[1:]))
        dist.all_gather_into_tensor(out, moved)
        return out.movedim(0, dim).contiguous()
