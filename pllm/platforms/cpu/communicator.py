"""Host collectives: gloo, with tensor parallelism's hot all-reduce through
a shared-memory segment when every rank is on this host.

Each rank is one process; ``init_method`` is a ``tcp://host:port`` or
``file:///path`` rendezvous shared by all ranks.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from pllm.platforms.common.communicator import TorchDistributedCommunicator


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
