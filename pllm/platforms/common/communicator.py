"""Collectives over ``torch.distributed``, for any plugin to use: the base
class over the default process group (gloo semantics), the NCCL/RCCL
communicator for GPUs that torch drives through its ``cuda`` device type
(NVIDIA, and AMD under a ROCm build of torch), and the host one (gloo, with
the all-reduce through shared memory when every rank is on this host).

Each rank is one process; ``init_method`` is a ``tcp://host:port`` or
``file:///path`` rendezvous shared by all ranks.
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist

from pllm.core.interfaces import Communicator


class TorchDistributedCommunicator(Communicator):
    """A :class:`Communicator` over the default ``torch.distributed`` group,
    or (from :meth:`new_group`) over a subgroup of it."""

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
        self._group = None  # None: the default group
        self._ranks = list(range(world_size))  # the default group's rank of each member
        self._timeout = timeout
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

    def _join_subgroup(self) -> None:
        """Optional, defaults to nothing: a subgroup's own state, made by its
        members together right after ``new_group`` (the host's shared memory)."""

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def new_group(self, ranks: list[int]) -> TorchDistributedCommunicator | None:
        """See :meth:`Communicator.new_group`; None on a rank outside ``ranks``.
        Members are numbered by increasing rank, as torch numbers them."""
        ranks = sorted(self._ranks[r] for r in ranks)
        group = dist.new_group(ranks, timeout=self._timeout)
        me = self._ranks[self._rank]
        if me not in ranks:
            return None
        sub = copy.copy(self)
        sub._rank, sub._world_size, sub._group, sub._ranks = ranks.index(me), len(ranks), group, ranks
        sub._join_subgroup()
        return sub

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor, group=self._group)
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
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._group)
        return total.chunk(self._world_size, dim=dim)[self._rank].contiguous()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=self._ranks[src], group=self._group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int):
        """Non-blocking (``dist.isend``): the handle's ``wait()`` says when
        ``tensor`` may be reused."""
        return dist.isend(tensor.contiguous(), dst=self._ranks[dst], group=self._group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        dist.recv(tensor, src=self._ranks[src], group=self._group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self._group)

    def close(self) -> None:
        """The default group's communicator destroys every group; a
        subgroup's leaves them to it."""
        if self._group is None and dist.is_initialized():
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
        dist.all_gather_into_tensor(out, moved, group=self._group)
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
        dist.reduce_scatter_tensor(out, moved, op=dist.ReduceOp.SUM, group=self._group)
        return out.movedim(0, dim).contiguous()

    def barrier(self) -> None:
        dist.barrier(group=self._group, device_ids=[self.device.index or 0])


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
        self._join_subgroup()

    def _join_subgroup(self) -> None:
        """The group's shared-memory segment (each subgroup its own)."""
        self._shm = None
        if self._world_size > 1:
            from pllm.platforms.common.shm import SharedMemoryAllReduce

            self._shm = SharedMemoryAllReduce.create(self._rank, self._world_size,
                                                     self._timeout.total_seconds(),
                                                     group=self._group)

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
