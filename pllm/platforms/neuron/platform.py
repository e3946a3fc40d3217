"""The Neuron platform (AWS Trainium / Inferentia): detection and
capabilities (no backend yet, so it detects with score 0 even on a
Trainium host).

Detection never imports the SDK: ``torch_neuronx`` must be findable by
``importlib.util.find_spec`` and a ``/dev/neuron<n>`` device file must exist.
The SDK is published on AWS's own package repository, not on PyPI.
"""

from __future__ import annotations

import importlib.util

import torch

from pllm.core.interfaces import Detection, PlatformCapabilities
from pllm.platforms.common.xla import UnimplementedXLAPlatform, device_files

DEVICE_GLOBS = ("/dev/neuron[0-9]*",)

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.bfloat16, torch.float32),
    default_dtype=torch.bfloat16,
    block_sizes=(16, 32, 64, 128),
    head_dims=(64, 128),
    # neuronx-cc compiles one graph per shape: the runner pads to these.
    token_buckets=(128, 256, 512, 1024, 2048, 4096),
    seq_buckets=(1, 2, 4, 8, 16, 32),
)


class NeuronPlatform(UnimplementedXLAPlatform):
    name = "neuron"
    device_globs = DEVICE_GLOBS
    hardware = "AWS Neuron devices"
    label = "Neuron"

    @classmethod
    def detect(cls) -> Detection:
        has_sdk = importlib.util.find_spec("torch_neuronx") is not None
        devices = device_files(DEVICE_GLOBS)
        if not has_sdk:
            seen = f"; {len(devices)} Neuron device file(s) exist" if devices else ""
            return Detection(
                0,
                "torch_neuronx is not installed (the Neuron SDK comes from AWS's package "
                f"repository, not PyPI){seen}",
            )
        if not devices:
            return Detection(0, "torch_neuronx is installed, but no /dev/neuron<n> device exists")
        compiler = "installed" if importlib.util.find_spec("neuronxcc") is not None else "missing"
        return cls.no_backend(
            f"{len(devices)} Neuron device(s) ({', '.join(devices)}); torch_neuronx installed, "
            f"neuronx-cc {compiler}"
        )

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES
