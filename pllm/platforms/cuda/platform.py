"""The CUDA platform: NVIDIA GPUs through a CUDA build of torch, Triton
attention kernels and NCCL collectives.

Detection reads ``torch.version.cuda`` and ``torch.cuda.is_available()``
(no kernel or Triton import); GPU names come from pynvml when installed.
Capabilities follow the compute capability of device 0: bf16 needs sm80+,
fp8 e4m3fn needs sm89+.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

from pllm.core.config import CacheConfig
from pllm.core.interfaces import (
    AttentionBackend,
    Communicator,
    Detection,
    KVCacheAllocator,
    MemoryInfo,
    Platform,
    PlatformCapabilities,
)
from pllm.platforms.cpu.allocator import BudgetKVCacheAllocator, KVCacheMemoryError

GPU_SCORE = 100

HEAD_DIMS = (64, 128, 256)  # what the Triton kernels are compiled for
BLOCK_SIZES = (16, 32)


def cuda_capabilities(compute_capability: tuple[int, int] | None) -> PlatformCapabilities:
    """Capabilities of a GPU with ``compute_capability`` (``None``: assume a
    current one, sm90)."""
    major_minor = compute_capability or (9, 0)
    has_bf16 = major_minor >= (8, 0)
    has_fp8 = major_minor >= (8, 9)
    dtypes = (
        (torch.bfloat16, torch.float16, torch.float32)
        if has_bf16
        else (torch.float16, torch.float32)
    )
    return PlatformCapabilities(
        dtypes=dtypes,
        default_dtype=torch.bfloat16 if has_bf16 else torch.float16,
        block_sizes=BLOCK_SIZES,
        head_dims=HEAD_DIMS,
        fp8_dtype=torch.float8_e4m3fn if has_fp8 else None,
        kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2) if has_fp8 else (),
        supports_graphs=True,
        profiles_memory=True,
        distributed_backend="nccl",
    )


class GPUKVCacheAllocator(BudgetKVCacheAllocator):
    """Default budget: what ``gpu_memory_utilization`` of the current GPU's
    total memory leaves after this process's peak in torch (weights plus the
    profiling pass's activations; not its throwaway KV cache) and the memory
    torch does not manage (the CUDA context, NCCL buffers, other processes)::

        budget = util * total - peak_allocated - (total - free - reserved)

    torch's cache of freed blocks counts as free: blocks a previous engine in
    the same process released (or a load's staging copies) are returned to
    the driver before measuring, not charged to the KV cache.
    """

    def __init__(self) -> None:
        self._peak: int | None = None

    def profile(self, forward) -> None:  # noqa: ANN001
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        throwaway_cache = forward()
        torch.cuda.synchronize()
        self._peak = torch.cuda.max_memory_allocated() - throwaway_cache

    def default_budget(self, cache_config: CacheConfig) -> tuple[int, str]:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        outside_torch = total - free - torch.cuda.memory_reserved()
        peak = torch.cuda.memory_allocated() if self._peak is None else self._peak
        util = cache_config.gpu_memory_utilization
        budget = int(util * total) - peak - outside_torch
        source = (f"gpu_memory_utilization={util:g} of the GPU's {_gib(total)} "
                  f"({_gib(util * total)}), less {_gib(peak)} of weights and activations "
                  f"and {_gib(outside_torch)} outside torch (CUDA context, other processes)")
        if budget <= 0:
            raise KVCacheMemoryError(
                f"no memory left for the KV cache: {source} leaves {_gib(budget)}; raise "
                f"--gpu-memory-utilization, free the GPU, or lower --max-num-batched-tokens "
                f"(the activation peak)")
        return budget, source


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


class CudaPlatform(Platform):
    name = "cuda"

    def __init__(self) -> None:
        self._capabilities: PlatformCapabilities | None = None

    @classmethod
    def detect(cls) -> Detection:
        version = torch.__version__
        cuda = torch.version.cuda
        if not cuda:
            hip = getattr(torch.version, "hip", None)
            if hip:
                return Detection(
                    0,
                    f"torch {version} is a ROCm build (HIP {hip}), not a CUDA build; "
                    "use --device rocm",
                )
            hint = ""
            if glob.glob("/dev/nvidia[0-9]*"):
                hint = "; NVIDIA device files exist: install a CUDA build of torch"
            return Detection(0, f"torch {version} is not a CUDA build{hint}")
        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return Detection(
                0,
                f"torch {version} is built for CUDA {cuda} but sees no GPU: "
                f"torch.cuda.is_available() is False (driver missing or "
                f"CUDA_VISIBLE_DEVICES={visible!r})",
            )
        count = torch.cuda.device_count()
        return Detection(
            GPU_SCORE,
            f"{count} NVIDIA GPU(s) visible (torch {version}, CUDA {cuda}){_nvml_names()}",
        )

    @property
    def capabilities(self) -> PlatformCapabilities:
        if self._capabilities is None:
            cc = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
            self._capabilities = cuda_capabilities(cc)
        return self._capabilities

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cuda", index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def memory_info(self, index: int = 0) -> MemoryInfo:
        free, total = torch.cuda.mem_get_info(index)
        return MemoryInfo(free_bytes=free, total_bytes=total)

    def make_attention_backend(self) -> AttentionBackend:
        # Lazy: Triton is imported only when an engine is built on a GPU.
        from pllm.platforms.cuda.attention import TritonAttentionBackend

        return TritonAttentionBackend()

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        return GPUKVCacheAllocator()

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from pllm.platforms.cuda.communicator import NcclCommunicator

        device = self.device(rank % max(self.device_count(), 1))
        return NcclCommunicator(rank, world_size, init_method, device=device)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def make_decode_runner(self, model, backend, kv_caches, config, max_model_len):
        """CUDA graphs of the decode step at 1, 2, 4, 8, 16, 32, ... up to
        ``max_num_seqs`` sequences (the engine skips this with ``--enforce-eager``)."""
        from pllm.core.graphs import decode_batch_sizes
        from pllm.platforms.cuda.graphs import CUDAGraphDecodeRunner

        if not self.capabilities.supports_graphs:
            return None
        return CUDAGraphDecodeRunner(
            model, backend, kv_caches, block_size=config.cache.block_size,
            max_model_len=max_model_len,
            batch_sizes=decode_batch_sizes(config.scheduler.max_num_seqs),
            device=kv_caches[0].device,
        )


def _nvml_names() -> str:
    """``": NVIDIA H100 80GB HBM3"`` via pynvml when installed; its failure is
    reported in the reason rather than hidden."""
    if importlib.util.find_spec("pynvml") is None:
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            names = {
                _text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)))
                for i in range(count)
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # reported, not raised: the GPU itself works
        return f"; pynvml failed: {type(exc).__name__}: {exc}"
    return f": {', '.join(sorted(names))}" if names else ""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
