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

from pllm.core.interfaces import Detection, KVCacheAllocator, PlatformCapabilities
from pllm.platforms.triton.platform import (
    BLOCK_SIZES,
    GPU_SCORE,
    HEAD_DIMS,
    WEIGHT_FORMATS,
    TorchGPUPlatform,
)


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
        kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2) if has_fp8 else (),
        weight_formats=WEIGHT_FORMATS,
        weight_format_dtypes=dtypes,
        supports_soft_cap=True,
        ray_resource="GPU",
        pipeline_parallel=True,  # NCCL sends between stages
        supports_graphs=True,
        profiles_memory=True,
    )


class CudaPlatform(TorchGPUPlatform):
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

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        from pllm.platforms.cuda.allocator import CudaKVCacheAllocator

        return CudaKVCacheAllocator()


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
