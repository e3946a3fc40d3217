"""The ROCm platform: AMD GPUs through a ROCm build of torch.

A ROCm build of torch exposes AMD GPUs through the ``torch.cuda`` API and
the ``"cuda"`` device type, and RCCL under the ``"nccl"`` backend name, so
this platform shares the GPU code of ``pllm.platforms.triton`` with the CUDA
platform (device, Triton attention, collectives, graphs, memory budget); it
differs in detection (``torch.version.hip``) and in fp8, which is
``float8_e4m3fnuz`` on MI300 (gfx94x) and OCP ``e4m3fn`` on gfx950 / RDNA4.
"""

from __future__ import annotations

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

KFD_PATH = "/dev/kfd"  # the AMD GPU compute driver's device file


def rocm_capabilities(gcn_arch: str | None) -> PlatformCapabilities:
    """Capabilities of an AMD GPU whose ``gcnArchName`` is ``gcn_arch``
    (e.g. ``"gfx942:sramecc+:xnack-"``; ``None``: assume MI300)."""
    arch = (gcn_arch or "gfx942").split(":")[0]
    if arch.startswith("gfx94"):
        fp8 = torch.float8_e4m3fnuz
    elif arch.startswith(("gfx95", "gfx12")):
        fp8 = torch.float8_e4m3fn
    else:
        fp8 = None
    return PlatformCapabilities(
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        default_dtype=torch.bfloat16,
        block_sizes=BLOCK_SIZES,
        head_dims=HEAD_DIMS,
        kv_cache_dtypes=(fp8,) if fp8 is not None else (),
        weight_formats=WEIGHT_FORMATS,
        weight_format_dtypes=(torch.bfloat16, torch.float16, torch.float32),
        supports_soft_cap=True,
        ray_resource="GPU",
        pipeline_parallel=True,  # RCCL sends between stages
        supports_graphs=True,  # HIP graphs, through torch.cuda.CUDAGraph
        profiles_memory=True,
    )


class RocmPlatform(TorchGPUPlatform):
    name = "rocm"

    def __init__(self) -> None:
        self._capabilities: PlatformCapabilities | None = None

    @classmethod
    def detect(cls) -> Detection:
        version = torch.__version__
        hip = getattr(torch.version, "hip", None)
        if not hip:
            hint = ""
            if os.path.exists(KFD_PATH):
                hint = (
                    f"; the AMD GPU driver is present ({KFD_PATH}): install a ROCm build of torch"
                )
            return Detection(
                0, f"torch {version} is not a ROCm build (torch.version.hip is None){hint}"
            )
        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            visible = os.environ.get("HIP_VISIBLE_DEVICES")
            kfd = "present" if os.path.exists(KFD_PATH) else "missing"
            return Detection(
                0,
                f"torch {version} is built for ROCm {hip} but sees no GPU: "
                f"torch.cuda.is_available() is False ({KFD_PATH} {kfd}, "
                f"HIP_VISIBLE_DEVICES={visible!r})",
            )
        count = torch.cuda.device_count()
        return Detection(
            GPU_SCORE, f"{count} AMD GPU(s) visible (torch {version}, ROCm {hip}){_amdsmi_names()}"
        )

    @property
    def capabilities(self) -> PlatformCapabilities:
        if self._capabilities is None:
            arch = None
            if torch.cuda.is_available():
                arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", None)
            self._capabilities = rocm_capabilities(arch)
        return self._capabilities

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        from pllm.platforms.rocm.allocator import RocmKVCacheAllocator

        return RocmKVCacheAllocator()


def _amdsmi_names() -> str:
    """``": AMD Instinct MI300X"`` via amdsmi when installed; its failure is
    reported in the reason rather than hidden."""
    if importlib.util.find_spec("amdsmi") is None:
        return ""
    try:
        import amdsmi

        amdsmi.amdsmi_init()
        try:
            names = {
                str(amdsmi.amdsmi_get_gpu_asic_info(handle).get("market_name", "?"))
                for handle in amdsmi.amdsmi_get_processor_handles()
            }
        finally:
            amdsmi.amdsmi_shut_down()
    except Exception as exc:  # reported, not raised: the GPU itself works
        return f"; amdsmi failed: {type(exc).__name__}: {exc}"
    return f": {', '.join(sorted(names))}" if names else ""
