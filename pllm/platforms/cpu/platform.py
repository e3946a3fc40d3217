"""The CPU platform: plain torch on the host. Always available, lowest score,
so any detected accelerator wins ``--device auto``."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import psutil
import torch

from pllm.core.interfaces import (
    AttentionBackend,
    Communicator,
    Detection,
    KVCacheAllocator,
    Platform,
    PlatformCapabilities,
)

CPU_SCORE = 10  # below every accelerator (100); third-party host plugins go lower or higher

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.float32, torch.bfloat16),
    default_dtype=torch.float32,
    kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2),
    ranks_share_device=True,  # tensor-parallel ranks split the cores
)


class CPUPlatform(Platform):
    name = "cpu"

    @classmethod
    def detect(cls) -> Detection:
        cores = os.cpu_count() or 1
        free_gib = psutil.virtual_memory().available / 2**30
        ipex = (
            "intel_extension_for_pytorch is importable (not used by this backend yet)"
            if importlib.util.find_spec("intel_extension_for_pytorch") is not None
            else "intel_extension_for_pytorch is not installed"
        )
        return Detection(
            CPU_SCORE, f"always available: {cores} cores, {free_gib:.1f} GiB RAM free; {ipex}"
        )

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def make_attention_backend(self) -> AttentionBackend:
        from pllm.platforms.cpu.attention import CPUAttentionBackend

        return CPUAttentionBackend()

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        from pllm.platforms.cpu.allocator import CPUKVCacheAllocator

        return CPUKVCacheAllocator()

    def update_config(self, config):
        """Tensor-parallel ranks split the cores this process may run on,
        unless ``num_threads`` says how many each gets."""
        size = config.parallel.tensor_parallel_size
        if size == 1 or config.device.num_threads:
            return config
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return dataclasses.replace(
            config, device=dataclasses.replace(config.device, num_threads=max(1, cores // size)))

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

    def prepare_model(self, model, config):
        from pllm.platforms.cpu.layers import use_cpu_layers
        from pllm.platforms.cpu.linear import use_cpu_linears
        from pllm.platforms.cpu.memory import tune_malloc

        tune_malloc()
        # --enforce-eager: every layer runs module by module, as the model's
        # code reads (the CPU's counterpart of not capturing CUDA graphs).
        fuse = not config.device.enforce_eager
        return use_cpu_layers(use_cpu_linears(model), fuse_decode_layers=fuse)

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from pllm.platforms.cpu.communicator import GlooCommunicator

        return GlooCommunicator(rank, world_size, init_method)
