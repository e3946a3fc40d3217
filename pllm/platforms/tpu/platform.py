"""The TPU platform: detection and capabilities (no backend yet, so it
detects with score 0 even on a TPU host).

Detection never imports jax or torch_xla: it asks ``importlib.util.find_spec``
whether a TPU runtime is installed and looks for TPU device files
(``/dev/accel*`` on v2-v4 hosts, ``/dev/vfio/<n>`` on v5e and later).
"""

from __future__ import annotations

import importlib.util

import torch

from pllm.core.interfaces import Detection, PlatformCapabilities
from pllm.platforms.common.xla import UnimplementedXLAPlatform, device_files

RUNTIME_PACKAGES = ("libtpu", "torch_xla")  # either one can drive a TPU
DEVICE_GLOBS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.bfloat16, torch.float32),
    default_dtype=torch.bfloat16,
    block_sizes=(16, 32, 64, 128),
    head_dims=(64, 128, 256),
    # XLA compiles one program per shape: the runner pads to these.
    token_buckets=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
    seq_buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


class TPUPlatform(UnimplementedXLAPlatform):
    name = "tpu"
    device_globs = DEVICE_GLOBS
    hardware = "Google TPUs"
    label = "TPU"

    @classmethod
    def detect(cls) -> Detection:
        runtimes = [p for p in RUNTIME_PACKAGES if importlib.util.find_spec(p) is not None]
        devices = device_files(DEVICE_GLOBS)
        if not runtimes:
            jax = importlib.util.find_spec("jax") is not None
            note = "jax is installed without libtpu (jax[tpu] adds it); " if jax else ""
            return Detection(
                0,
                f"no TPU runtime: {note}neither libtpu nor torch_xla is installed "
                "(pip install pllm[tpu])",
            )
        if not devices:
            return Detection(
                0,
                f"{' and '.join(runtimes)} installed, but no TPU device file "
                f"({', '.join(DEVICE_GLOBS)}) exists: not a TPU host",
            )
        return cls.no_backend(
            f"{len(devices)} TPU device file(s) ({', '.join(devices)}); runtime: "
            f"{', '.join(runtimes)}"
        )

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES
