"""What the XLA platforms (TPU, Neuron) share: detection helpers, the opt-in
emulation on XLA's CPU backend, and the factories for the XLA attention
backend, allocator and communicator.

A subclass sets its names, its device files, its PJRT device, its
capabilities (bucketed: the core pads every step to them) and which
attention kernel it has (:meth:`XLAPlatform.attention_kernel`).

Emulation: with ``PLLM_XLA_EMULATE=cpu`` (and torch_xla installed) a
platform runs on torch-xla's CPU backend (``PJRT_DEVICE=CPU``) on a host
without its chip, through the same static-shape path and the torch
attention: for tests and CI, not speed. It scores below the cpu platform, so
``--device auto`` still picks the host; ask for it with ``--device tpu``.
Without the variable nothing changes.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from typing import ClassVar

import torch

from pllm.core.interfaces import (
    AttentionBackend,
    Communicator,
    Detection,
    KVCacheAllocator,
    Platform,
)
from pllm.platforms.common.xla import runtime
from pllm.platforms.common.xla.pallas import RaggedKernel

logger = logging.getLogger("pllm")

ACCELERATOR_SCORE = 100  # a TPU/Neuron host with its runtime
EMULATED_SCORE = 1  # available on request, never ahead of the cpu platform (10)
EMULATE_ENV = "PLLM_XLA_EMULATE"
# "torch" runs the torch paged attention even where a kernel exists.
ATTENTION_ENV = "PLLM_XLA_ATTENTION"


def device_files(patterns: tuple[str, ...]) -> list[str]:
    """Device files matching any of ``patterns``, sorted, without duplicates."""
    return sorted({path for pattern in patterns for path in glob.glob(pattern)})


class XLAPlatform(Platform):
    device_globs: ClassVar[tuple[str, ...]] = ()
    hardware: ClassVar[str] = "an XLA device"
    label: ClassVar[str] = "XLA"  # as people write the platform's name: "TPU", "Neuron"
    pjrt_device: ClassVar[str] = "CPU"  # PJRT_DEVICE on the real chip

    # ---- detection ---------------------------------------------------------

    @classmethod
    def emulated(cls) -> bool:
        return os.environ.get(EMULATE_ENV) == "cpu"

    @classmethod
    def detect_emulation(cls) -> Detection | None:
        """The detection under ``PLLM_XLA_EMULATE``; None when it is unset."""
        value = os.environ.get(EMULATE_ENV)
        if not value:
            return None
        if value != "cpu":
            return Detection(0, f"{EMULATE_ENV}={value!r}: the one emulation pllm has is 'cpu' "
                                "(XLA's CPU backend)")
        if importlib.util.find_spec("torch_xla") is None:
            return Detection(0, f"{EMULATE_ENV}=cpu asks for XLA on the host CPU, but torch_xla "
                                "is not installed (pip install 'pllm[tpu]')")
        return Detection(EMULATED_SCORE, f"XLA on the host CPU (PJRT CPU), emulating a "
                                         f"{cls.label}: for tests, not speed ({EMULATE_ENV}=cpu)")

    # ---- devices -----------------------------------------------------------

    def device(self, index: int = 0) -> torch.device:
        # One rank per process; each process sees its own device as xla:0.
        return torch.device("xla", 0)

    def device_count(self) -> int:
        if self.emulated():
            return 1
        return len(device_files(self.device_globs))

    def setup_process(self, config, rank: int) -> None:
        # What the kernel's tiling depends on (a config not yet resolved: the default dtype).
        cache = config.cache
        self.cache_dtype = (cache.torch_cache_dtype if cache.cache_dtype
                            else self.capabilities.default_dtype)
        runtime.start("CPU" if self.emulated() else self.pjrt_device)

    def synchronize(self) -> None:
        runtime.wait()

    def graph_break(self) -> None:
        runtime.sync()

    def compilations(self) -> tuple[int, float]:
        return runtime.compilations()

    # ---- factories ---------------------------------------------------------

    def attention_kernel(self) -> tuple[RaggedKernel | None, str]:
        """The ragged paged-attention kernel to use and its name, or None and
        why the torch paged attention runs instead. Subclasses override."""
        return None, f"pllm has no {self.label} attention kernel"

    def make_attention_backend(self) -> AttentionBackend:
        from pllm.platforms.common.xla.attention import XLAPagedAttention

        if os.environ.get(ATTENTION_ENV) == "torch":
            kernel, why = None, f"{ATTENTION_ENV}=torch"
        elif self.emulated():
            kernel, why = None, "emulated on XLA's CPU backend, where Pallas TPU kernels do not run"
        else:
            kernel, why = self.attention_kernel()
        if kernel is None:
            logger.info("%s attention: the torch paged attention (%s)", self.name, why)
            return XLAPagedAttention()
        logger.info("%s attention: %s", self.name, why)
        return XLAPagedAttention(kernel, kernel_name=why,
                                 cache_dtype=getattr(self, "cache_dtype", torch.bfloat16))

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        from pllm.platforms.common.xla.allocator import XLAKVCacheAllocator

        return XLAKVCacheAllocator(self.device())

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from pllm.platforms.common.xla.communicator import XLACommunicator

        if self.emulated() and world_size > 1:
            raise ValueError(
                "tensor parallelism does not run on XLA's CPU backend: each process is a world "
                "of one device there, so an all-reduce over the xla process group returns each "
                "rank's own tensor (tensor_parallel_size must be 1 under PLLM_XLA_EMULATE=cpu)")
        return XLACommunicator(rank, world_size, init_method)
