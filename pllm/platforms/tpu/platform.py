"""The TPU platform: torch-xla on Google TPUs, through the shared XLA path
(``pllm.platforms.common.xla``), with torch-xla's Pallas ragged
paged-attention kernel.

Detection never imports jax or torch_xla: it asks ``importlib.util.find_spec``
whether a TPU runtime is installed and looks for TPU device files
(``/dev/accel*`` on v2-v4 hosts, ``/dev/vfio/<n>`` on v5e and later). With
``PLLM_XLA_EMULATE=cpu`` it runs on XLA's CPU backend instead (tests).
"""

from __future__ import annotations

import importlib.util

import torch

from pllm.core.interfaces import Detection, PlatformCapabilities
from pllm.platforms.common.xla.pallas import RaggedKernel, torch_xla_kernel
from pllm.platforms.common.xla.platform import ACCELERATOR_SCORE, XLAPlatform, device_files

RUNTIME_PACKAGES = ("torch_xla", "libtpu")  # torch_xla drives the TPU; libtpu is its runtime
DEVICE_GLOBS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.bfloat16, torch.float32),
    default_dtype=torch.bfloat16,
    block_sizes=(16, 32, 64, 128),
    head_dims=None,  # any: the torch path takes every head_dim, the kernel gets it padded
    supports_sliding_window=True,
    supports_soft_cap=True,  # the torch path and the ragged kernel's signature take it
    inference_mode=False,  # torch-xla's tensors cannot be inference tensors
    ray_resource="TPU",
    # XLA compiles one program per shape: the runner pads to these.
    token_buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
    seq_buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class TPUPlatform(XLAPlatform):
    name = "tpu"
    device_globs = DEVICE_GLOBS
    hardware = "Google TPUs"
    label = "TPU"
    pjrt_device = "TPU"

    @classmethod
    def detect(cls) -> Detection:
        emulation = cls.detect_emulation()
        if emulation is not None:
            return emulation
        installed = [p for p in RUNTIME_PACKAGES if importlib.util.find_spec(p) is not None]
        devices = device_files(DEVICE_GLOBS)
        if "torch_xla" not in installed:
            jax = importlib.util.find_spec("jax") is not None
            note = "jax is installed, but pllm drives TPUs through torch_xla; " if jax else ""
            have = f"{' and '.join(installed)} installed, but " if installed else ""
            return Detection(0, f"no TPU runtime: {note}{have}torch_xla is not installed "
                                "(pip install 'pllm[tpu]')")
        if not devices:
            return Detection(0, f"{' and '.join(installed)} installed, but no TPU device file "
                                f"({', '.join(DEVICE_GLOBS)}) exists: not a TPU host")
        return Detection(ACCELERATOR_SCORE, f"{len(devices)} TPU device file(s) "
                                            f"({', '.join(devices)}); runtime: {', '.join(installed)}")

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES

    def attention_kernel(self) -> tuple[RaggedKernel | None, str]:
        if importlib.util.find_spec("jax") is None:
            return None, "jax is not installed, and torch-xla's Pallas kernels need it"
        return torch_xla_kernel(), "torch-xla's Pallas ragged paged-attention kernel"
