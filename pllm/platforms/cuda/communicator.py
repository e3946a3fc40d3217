"""NCCL collectives for NVIDIA GPUs (and RCCL on ROCm, which torch exposes
under the same ``"nccl"`` backend name). Same semantics as the gloo
communicator; NCCL has native all-gather and reduce-scatter into one tensor."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from pllm.platforms.cpu.communicator import TorchDistributedCommunicator


class NcclCommunicator(TorchDistributedCommunicator):
    """One process per GPU; ``device`` is this rank's GPU."""

    backend = "nccl"

    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        device: torch.device,
        timeout: timedelta = timedelta(minutes=5),
    ) -> None:
        self.device = device
        super().__init__(rank, world_size, init_method, timeout=timeout)

    def _setup_device(self) -> None:
        # NCCL binds a communicator to the current device: set it first.
        torch.cuda.set_device(self.device)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        moved = tensor.movedim(dim, 0).contiguous()
        out = moved.new_empty((self.world_size * moved.shape[0], *moved.shape[1:]))
        dist.all_gather_into_tensor(out, moved)
        return out.movedim(0, dim).contiguous()

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        size = tensor.shape[dim]
        if size % self.world_size:
            raise ValueError(
                f"reduce_scatter needs dim {dim} (size {size}) divisible by "
                f"world_size {self.world_size}"
            )
        moved = tensor.movedim(dim, 0).contiguous()
        out = moved.new_empty((size // self.world_size, *moved.shape[1:]))
        dist.reduce_scatter_tensor(out, moved, op=dist.ReduceOp.SUM)
        return out.movedim(0, dim).contiguous()

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.device.index or 0])
