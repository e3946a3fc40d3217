"""The fake accelerator: a complete platform of its own that runs on the
host, written only against pllm's public contract (``pllm.core``), the
building blocks any plugin may use (``pllm.platforms.common``) and the
reference math (``pllm.testing``). It imports nothing from another platform.

Its detection score is steered by ``PLLM_FAKEACCEL_SCORE`` (default 1).
"""

from __future__ import annotations

import os

import torch

from pllm.core.interfaces import (
    AttentionBackend,
    Communicator,
    Detection,
    KVCacheAllocator,
    Platform,
    PlatformCapabilities,
)

SCORE_ENV = "PLLM_FAKEACCEL_SCORE"
DEFAULT_SCORE = 1  # available, but below cpu: installing it changes no auto selection

_CAPABILITIES = PlatformCapabilities(
    dtypes=(torch.float32, torch.bfloat16),
    default_dtype=torch.float32,
    block_sizes=(8, 16, 32),
    default_block_size=16,
    kv_cache_dtypes=(torch.float8_e4m3fn, torch.float8_e5m2),
    # Every rank runs on the host: they share its one "device".
    ranks_share_device=True,
)


class FakeAccelPlatform(Platform):
    name = "fakeaccel"

    @classmethod
    def detect(cls) -> Detection:
        raw = os.environ.get(SCORE_ENV)
        if raw is None:
            return Detection(DEFAULT_SCORE, f"fake accelerator on the host ({SCORE_ENV} unset)")
        score = int(raw)
        if score == 0:
            return Detection(0, f"disabled by {SCORE_ENV}=0")
        return Detection(score, f"fake accelerator on the host ({SCORE_ENV}={score})")

    @property
    def capabilities(self) -> PlatformCapabilities:
        return _CAPABILITIES

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")  # ranks share it (see the capabilities)

    def device_count(self) -> int:
        return 1

    def make_attention_backend(self) -> AttentionBackend:
        from pllm_fakeaccel.attention import FakeAccelAttentionBackend

        return FakeAccelAttentionBackend()

    def make_kv_cache_allocator(self) -> KVCacheAllocator:
        from pllm_fakeaccel.allocator import FakeAccelAllocator

        return FakeAccelAllocator()

    def make_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from pllm.platforms.common.communicator import TorchDistributedCommunicator

        return TorchDistributedCommunicator(rank, world_size, init_method)  # gloo
