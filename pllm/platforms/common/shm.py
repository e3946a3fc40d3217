"""All-reduce through a shared-memory segment, for ranks on one host: any
plugin whose tensors live in host memory may use it (the CPU platform's
communicator does).

gloo's all-reduce goes through TCP on loopback: about 1.6 ms for a 576-float
row between two processes on this project's 2-core machine, twice per layer,
which makes tensor parallelism on one host slower than one rank. Ranks that
share a host instead copy their part into a segment, wait on each other's step
counters and sum in rank order (``csrc/shm_all_reduce.cpp``): microseconds.

The segment is a file that rank 0 creates (space reserved with
``posix_fallocate``, so a full ``/dev/shm`` is an error here rather than a
SIGBUS later), every rank maps, and rank 0 unlinks once all have mapped: it
disappears with the last rank. Set ``PLLM_CPU_SHM_ALLREDUCE=0`` to keep
every collective on gloo.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import tempfile
import threading
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from pllm.platforms.common.cpp import build_extension

logger = logging.getLogger(__name__)

DISABLE_ENV = "PLLM_CPU_SHM_ALLREDUCE"
_LINE = 8  # int64 words per rank in the header
_MAX_SEGMENT = 32 << 20  # bytes of data slots, all ranks, both parities


@functools.cache
def shm_ops():
    """The compiled ``shm_all_reduce_`` (``csrc/shm_all_reduce.cpp``), or None
    where it cannot be built (the reason logged once). Built with the
    communicator (:meth:`SharedMemoryAllReduce.create`), at start."""
    try:
        return build_extension("pllm_shm_all_reduce", Path(__file__).parent / "csrc",
                               ["shm_all_reduce.cpp"], ["shm_all_reduce_"])
    except Exception as exc:  # no compiler, no ninja, ...: gloo, but say so
        logger.warning("shared-memory all-reduce unavailable (%s); collectives stay on gloo", exc)
        return None


class SharedMemoryAllReduce:
    def __init__(self, path: str, rank: int, world: int, capacity: int, timeout_s: float) -> None:
        self._op = shm_ops().shm_all_reduce_
        self.rank, self.world, self.capacity, self.timeout_s = rank, world, capacity, timeout_s
        if not os.path.exists(path):  # another /dev/shm (IPC namespace): from_file would create one
            raise FileNotFoundError(f"{path} is not visible from rank {rank}")
        header_bytes = world * _LINE * 8
        segment = torch.from_file(path, shared=True, size=segment_bytes(world, capacity),
                                  dtype=torch.uint8)
        self._header = segment[:header_bytes].view(torch.int64)
        self._data = segment[header_bytes:].view(torch.float32)
        self._header[rank * _LINE + 1] = os.getpid()
        self._step = 1
        self._lock = threading.Lock()  # one call at a time: the step counter and slots are shared
        self._failed: str | None = None

    @classmethod
    def create(cls, rank: int, world: int, timeout_s: float,
               group=None) -> SharedMemoryAllReduce | None:
        """Collective over ``group`` (a gloo group; None: the default one),
        whose rank here is ``rank`` of ``world``: every rank gets an
        instance, or every rank gets None (ranks on several hosts, kernels not
        built, no room for the segment; the reason is logged by rank 0)."""
        capacity = max(1024, _MAX_SEGMENT // (2 * world * 4)) // 16 * 16  # whole cache lines
        local = ""
        if os.environ.get(DISABLE_ENV, "1") == "0":
            local = f"{DISABLE_ENV}=0"
        elif shm_ops() is None:
            local = "the shared-memory all-reduce kernel is not built"
        reasons, hosts = [None] * world, [None] * world
        dist.all_gather_object(reasons, local, group=group)
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        why = next((f"rank {r}: {text}" for r, text in enumerate(reasons) if text), "")
        if not why and len(set(hosts)) != 1:
            why = f"ranks on several hosts ({', '.join(sorted(set(hosts)))})"
        path = ""
        if not why and rank == 0:
            try:
                path = _reserve(segment_bytes(world, capacity))
            except OSError as exc:
                why = f"no shared-memory segment ({exc})"
        box = [(why, path)]
        # Rank 0 alone knows whether the segment exists.
        dist.broadcast_object_list(box, src=0 if group is None else dist.get_global_rank(group, 0),
                                   group=group)
        why, path = box[0]
        instance, error = None, ""
        try:
            if not why:
                try:
                    instance = cls(path, rank, world, capacity, timeout_s)
                except Exception as exc:  # noqa: BLE001 - agreed on below, then logged
                    error = repr(exc)
            errors = [None] * world
            dist.all_gather_object(errors, error, group=group)
        finally:
            if rank == 0 and path:
                os.unlink(path)  # every rank has mapped it (or failed to): the name can go
        failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
        if failed:
            why, instance = "; ".join(failed), None
        if why and rank == 0:
            logger.info("all-reduce stays on gloo: %s", why)
        return instance

    @staticmethod
    def handles(tensor: torch.Tensor) -> bool:
        """Floating-point host tensors (summed in fp32); the rest stays on gloo."""
        return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (fp32 inside). After a
        failure (a peer gone, a timeout, sizes that differ) the ranks are out
        of step for good: every later call raises."""
        with self._lock:
            if self._failed is not None:
                raise RuntimeError(f"shared-memory all-reduce unusable after: {self._failed}")
            work = tensor if tensor.dtype == torch.float32 and tensor.is_contiguous() \
                else tensor.to(torch.float32).contiguous()
            try:
                self._step = self._op(work, self._header, self._data, self.rank, self.world,
                                      self.capacity, self._step, self.timeout_s)
            except RuntimeError as exc:
                self._failed = str(exc)
                raise
            return tensor if work is tensor else tensor.copy_(work)


def segment_bytes(world: int, capacity: int) -> int:
    return world * _LINE * 8 + 2 * world * capacity * 4


def _reserve(nbytes: int) -> str:
    """A new file of ``nbytes`` in /dev/shm (or the temp dir), its space reserved."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(folder, f"pllm-allreduce-{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path
