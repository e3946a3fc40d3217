"""The CPU platform: plain torch on the host. Always available, lowest score,
so any detected accelerator wins ``--device auto``."""

from __future__ import annotations

import os

import psutil
import torch

from pllm.core.interfaces import AttentionBackend, Detection, PlatformCapabilities
from pllm.platforms.common.host import CPU_SCORE, HostPlatform

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.float32, torch.bfloat16),
    default_dtype=torch.float32,
    kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2),
    supports_soft_cap=True,
    weight_formats=("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"),  # gguf_linear.py
    ranks_share_device=True,  # tensor-parallel ranks split the cores
    pipeline_parallel=True,  # gloo sends between stages
)


class CPUPlatform(HostPlatform):
    name = "cpu"

    @classmethod
    def detect(cls) -> Detection:
        cores = os.cpu_count() or 1
        free_gib = psutil.virtual_memory().available / 2**30
        return Detection(CPU_SCORE, f"always available: {cores} cores, {free_gib:.1f} GiB RAM free")

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES

    def make_attention_backend(self) -> AttentionBackend:
        from pllm.platforms.cpu.attention import CPUAttentionBackend

        return CPUAttentionBackend()

    def setup_process(self, config, rank: int) -> None:
        """Also loads the compiled kernels, building them the first time
        (logged), so that the first request does not wait for a build."""
        from pllm.platforms.cpu.kernels import cpu_ops

        super().setup_process(config, rank)
        cpu_ops()

    def prepare_model(self, model, config):
        from pllm.platforms.common.malloc import tune_malloc
        from pllm.platforms.cpu.gguf_linear import use_gguf_kernels
        from pllm.platforms.cpu.layers import use_cpu_layers
        from pllm.platforms.cpu.linear import use_cpu_linears
        from pllm.platforms.cpu.moe import use_cpu_moe

        tune_malloc()
        # --enforce-eager: every layer runs module by module, as the model's
        # code reads (the CPU's counterpart of not capturing CUDA graphs).
        fuse = not config.device.enforce_eager
        model = use_gguf_kernels(model)
        return use_cpu_moe(use_cpu_layers(use_cpu_linears(model), fuse_decode_layers=fuse))
