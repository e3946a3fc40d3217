"""What every platform whose tensors live in host memory shares (cpu, ipex,
a third-party CPU plugin): the device, the KV-cache budget in RAM, the
collectives (gloo, the all-reduce through shared memory), torch's thread
count per tensor-parallel rank, and glibc malloc tuned for the engine's
allocation pattern. A host platform subclasses :class:`HostPlatform` and
adds its detection, capabilities, attention backend and layers."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from pllm.core.interfaces import Communicator, KVCacheAllocator, Platform

# The plain cpu platform's score: below every accelerator (100). A host
# plugin that is faster on a CPU goes above it there, and below it elsewhere.
CPU_SCORE = 10


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _cpuinfo(*keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line naming one of ``keys``
    (the first CPU's), None where there is no such line or file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The feature flags of this host's first CPU (x86 ``flags``, arm
    ``Features``), empty where ``/proc/cpuinfo`` has none."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... (``/proc/cpuinfo``), or ``unknown``."""
    return _cpuinfo("vendor_id") or "unknown"


class HostPlatform(Platform):
    """A platform on the host CPU. Tensor-parallel ranks share the device
    (the capabilities say ``ranks_share_device``) and split its cores."""

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        from pllm.platforms.common.allocator import HostKVCacheAllocator

        return HostKVCacheAllocator()

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from pllm.platforms.common.communicator import GlooCommunicator

        return GlooCommunicator(rank, world_size, init_method)

    def update_config(self, config):
        """The ranks (tensor and pipeline parallel) split the cores this process may run on,
        unless ``num_threads`` says how many each gets."""
        size = config.parallel.world_size
        if size == 1 or config.device.num_threads:
            return config
        return dataclasses.replace(config, device=dataclasses.replace(
            config.device, num_threads=max(1, usable_cores() // size)))

    def setup_process(self, config, rank: int) -> None:
        """torch's intra-op threads: ``num_threads`` per rank (``update_config``
        split the cores among tensor-parallel ranks); restored at teardown."""
        self._threads_before = torch.get_num_threads()
        if config.device.num_threads:
            torch.set_num_threads(config.device.num_threads)

    def teardown_process(self) -> None:
        before = self.__dict__.pop("_threads_before", None)
        if before is not None:
            torch.set_num_threads(before)
