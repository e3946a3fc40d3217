"""Shared shell of the XLA platforms (TPU, Neuron): device naming, the
honest "not implemented" factories, and the detection rule that keeps a
platform without a backend out of ``--device auto``. Both compile per
shape, so their capabilities carry token/sequence buckets."""

from __future__ import annotations

import glob
from typing import ClassVar

import torch

from pllm.core.interfaces import (
    AttentionBackend,
    Communicator,
    Detection,
    KVCacheAllocator,
    Platform,
)
from pllm.plugins.errors import BackendNotImplementedError

ACCELERATOR_SCORE = 100  # what a TPU/Neuron host scores once its backend runs


def device_files(patterns: tuple[str, ...]) -> list[str]:
    """Device files matching any of ``patterns``, sorted, without duplicates."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


class UnimplementedXLAPlatform(Platform):
    """Detection and capabilities only: every factory raises
    :class:`BackendNotImplementedError` rather than pretending to work."""

    device_globs: ClassVar[tuple[str, ...]] = ()
    hardware: ClassVar[str] = "an XLA device"
    label: ClassVar[str] = "XLA"  # as people write the platform's name: "TPU", "Neuron"

    @classmethod
    def no_backend(cls, found: str) -> Detection:
        """Score 0 on a host that has the hardware: until the backend exists,
        the platform must never win ``--device auto`` and then fail at its
        first factory. ``found`` says what detection saw."""
        return Detection(
            0,
            f"{found}; but pllm has no {cls.label} backend yet, so the platform cannot run "
            "(pass --device cpu)",
        )

    def device(self, index: int = 0) -> torch.device:
        return torch.device("xla", index)

    def device_count(self) -> int:
        return len(device_files(self.device_globs))

    def make_attention_backend(self) -> AttentionBackend:
        raise self._missing("attention backend")

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        raise self._missing("KV-cache allocator")

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        raise self._missing("communicator")

    def _missing(self, what: str) -> BackendNotImplementedError:
        return BackendNotImplementedError(
            f"pllm has no {self.name} {what} yet: the {self.name!r} platform only detects "
            f"{self.hardware} and describes its capabilities; the backend has to be written and "
            f"verified on that hardware (see pllm/platforms/{self.name}/README.md). "
            "Pass --device cpu to run on the host."
        )
