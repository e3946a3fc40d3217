"""Collectives over ``torch.distributed``, for any plugin to use: the base
class over the default process group (gloo semantics), the NCCL/RCCL
communicator for GPUs that torch drives through its ``cuda`` device type
(NVIDIA, and AMD under a ROCm build of torch), and the host one (gloo, with
the all-reduce through shared memory when every rank is on this host).

Each rank is one process; ``init_method`` is a ``tcp://host:port`` or
``file:///path`` rendezvous shared by all ranks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist

from pllm.core.interfaces import Communicator


class TorchDistributedCommunicator(Communicator):
    """A :class:`Communicator` over the default ``torch.distributed`` group."""

    backend: ClassVar[str] = "gloo"

    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        timeout: timedelta = timedelta(minutes=5),
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialized in this process; "
                "one communicator per process"
            )
        self._rank, self._world_size = rank, world_size
        self._setup_device()
        dist.init_process_group(
            self.backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )

    def _setup_device(self) -> None:
        """Optional, defaults to nothing: bind this process to its device
        before the process group starts (GPU subclasses)."""

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        size = tensor.shape[dim]
        if size % self._world_size:
            raise ValueError(
                f"reduce_scatter needs dim {dim} (size {size}) divisible by "
                f"world_size {self._world_size}"
            )
        # gloo has no reduce_scatter: sum everything, keep this rank's slice.
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.chunk(self._world_size, dim=dim)[self._rank].contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(tensor.contiguous(), dst=dst)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


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


class GlooCommunicator(TorchDistributedCommunicator):
    """Host collectives (gloo): the CPU platform and any platform whose
    tensors live in host memory. When every rank is on this host,
    ``all_reduce`` (tensor parallelism's hot path) goes through a
    shared-memory segment instead (``pllm.platforms.common.shm``)."""

    backend = "gloo"

    def __init__(self, rank: int, world_size: int, init_method: str,
                 timeout: timedelta = timedelta(minutes=5)) -> None:
        super().__init__(rank, world_size, init_method, timeout=timeout)
        self._shm = None
        if world_size > 1:
            from pllm.platforms.common.shm import SharedMemoryAllReduce

            self._shm = SharedMemoryAllReduce.create(rank, world_size, timeout.total_seconds())

    @property
    def uses_shared_memory(self) -> bool:
        return self._shm is not None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._shm is not None and self._shm.handles(tensor):
            return self._shm.all_reduce(tensor)
        return super().all_reduce(tensor)

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Through shared memory as a sum: each rank's part in its own place
        of a zeroed stack (the LM head's logits under tensor parallelism)."""
        if self._shm is None or not self._shm.handles(tensor):
            return super().all_gather(tensor, dim)
        parts = tensor.new_zeros((self.world_size, *tensor.shape))
        parts[self.rank] = tensor
        self._shm.all_reduce(parts)
        return torch.cat(parts.unbind(0), dim=dim)
