"""What the two GPU platforms that torch drives through its ``cuda`` device
type share: NVIDIA under a CUDA build of torch, AMD under a ROCm build. The
device API, the Triton attention backend and MoE kernels, NCCL (RCCL)
collectives and graph capture are the same; each platform adds its
detection, its capabilities and its allocator."""

from __future__ import annotations

import torch

from pllm.core.interfaces import AttentionBackend, Communicator, Platform

GPU_SCORE = 100
HEAD_DIMS = (64, 128, 256)  # what the Triton kernels are compiled for
BLOCK_SIZES = (16, 32)
# Weight formats triton/quant.py multiplies (in any of the platform's dtypes).
WEIGHT_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "F8_E4M3")


class TorchGPUPlatform(Platform):
    """Base class of ``cuda`` and ``rocm``; not a platform by itself (no
    ``name``, ``detect`` or ``capabilities``)."""

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cuda", index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def physical_device_id(self, index: int = 0) -> str:
        """Through CUDA_VISIBLE_DEVICES (NVIDIA) or HIP_VISIBLE_DEVICES (AMD)."""
        import os

        visible = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("HIP_VISIBLE_DEVICES")
        return visible.split(",")[index] if visible else str(index)

    def make_attention_backend(self) -> AttentionBackend:
        # Lazy: Triton is imported only when an engine is built on a GPU.
        from pllm.platforms.triton.attention import TritonAttentionBackend

        return TritonAttentionBackend()

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from pllm.platforms.common.communicator import NcclCommunicator

        device = self.device(rank % max(self.device_count(), 1))
        return NcclCommunicator(rank, world_size, init_method, device=device)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def prepare_model(self, model, config):
        """MoE blocks run their experts through the Triton grouped GEMM
        (``triton/moe.py``), kept quantized weights through the Triton
        dequantizing GEMM or fp8 (``triton/quant.py``); a model with neither
        is returned as it is."""
        from pllm.platforms.triton.moe import use_triton_moe
        from pllm.platforms.triton.quant import use_triton_quant

        return use_triton_quant(use_triton_moe(model))

    def make_decode_runner(self, model, backend, kv_caches, config):
        """CUDA (HIP) graphs of the decode step at 1, 2, 4, 8, 16, 32, ... up to
        ``max_num_seqs`` sequences. The engine asks only when the capabilities
        say ``supports_graphs`` and ``--enforce-eager`` is off."""
        from pllm.core.graphs import decode_batch_sizes
        from pllm.platforms.triton.graphs import CUDAGraphDecodeRunner

        return CUDAGraphDecodeRunner(
            model, backend, kv_caches, block_size=config.cache.block_size,
            max_model_len=config.model.max_model_len,
            batch_sizes=decode_batch_sizes(config.scheduler.max_num_seqs),
            device=kv_caches[0].device,
        )
