"""The Neuron platform (AWS Trainium / Inferentia): torch-neuronx, itself
built on torch-xla, through the shared XLA path (``pllm.platforms.common.xla``).

Detection never imports the SDK: ``torch_neuronx`` must be findable by
``importlib.util.find_spec`` and a ``/dev/neuron<n>`` device file must exist.
The SDK is published on AWS's own package repository, not on PyPI. With
``PLLM_XLA_EMULATE=cpu`` it runs on XLA's CPU backend instead (tests).

Attention runs the torch paged attention, compiled by neuronx-cc, until an
NKI kernel plugs in: set :attr:`NeuronPlatform.paged_attention_kernel` (from a
plugin of your own, subclassing this platform) to a callable with torch-xla's
ragged paged-attention signature (``pllm.platforms.common.xla.pallas``); the
cache layout and the padding to its shapes are then the same as on a TPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import ClassVar

import torch

from pllm.core.interfaces import Detection, PlatformCapabilities
from pllm.platforms.common.xla.pallas import RaggedKernel
from pllm.platforms.common.xla.platform import ACCELERATOR_SCORE, XLAPlatform, device_files

DEVICE_GLOBS = ("/dev/neuron[0-9]*",)
# neuronx-cc's compile cache: compiled programs survive restarts.
COMPILE_CACHE_ENV = "NEURON_COMPILE_CACHE_URL"
DEFAULT_COMPILE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "pllm", "neuron-compile-cache")

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.bfloat16, torch.float32),
    default_dtype=torch.bfloat16,
    block_sizes=(16, 32, 64, 128),
    head_dims=None,  # any: the torch path takes every head_dim, the kernel gets it padded
    supports_sliding_window=True,
    supports_soft_cap=True,  # the torch path and the ragged kernel's signature take it
    inference_mode=False,  # torch-xla's tensors cannot be inference tensors
    ray_resource="neuron_cores",
    # neuronx-cc compiles one graph per shape, slowly: fewer, larger buckets.
    token_buckets=(128, 256, 512, 1024, 2048, 4096),
    seq_buckets=(1, 2, 4, 8, 16, 32),
)


class NeuronPlatform(XLAPlatform):
    name = "neuron"
    device_globs = DEVICE_GLOBS
    hardware = "AWS Neuron devices"
    label = "Neuron"
    pjrt_device = "NEURON"
    # The NKI slot: a ragged paged-attention kernel with torch-xla's signature.
    paged_attention_kernel: ClassVar[RaggedKernel | None] = None

    @classmethod
    def detect(cls) -> Detection:
        emulation = cls.detect_emulation()
        if emulation is not None:
            return emulation
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
        if importlib.util.find_spec("neuronxcc") is None:
            return Detection(0, f"{len(devices)} Neuron device(s) and torch_neuronx, but the "
                                "compiler (neuronx-cc) is not installed")
        return Detection(ACCELERATOR_SCORE, f"{len(devices)} Neuron device(s) ({', '.join(devices)}); "
                                            "torch_neuronx and neuronx-cc installed")

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES

    def setup_process(self, config, rank: int) -> None:
        if not self.emulated():
            os.environ.setdefault(COMPILE_CACHE_ENV, DEFAULT_COMPILE_CACHE)
            import torch_neuronx  # noqa: F401  (registers the Neuron PJRT plugin)
        super().setup_process(config, rank)

    def attention_kernel(self) -> tuple[RaggedKernel | None, str]:
        if self.paged_attention_kernel is None:
            return None, "no NKI paged-attention kernel is plugged in (NeuronPlatform.paged_attention_kernel)"
        return self.paged_attention_kernel, "the NKI paged-attention kernel plugged in"
