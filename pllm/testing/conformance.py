"""The platform conformance checks, as plain functions a vendor can call
from their own tests (or run all at once with ``pllm platforms --check NAME``).

Each ``check_*`` raises ``AssertionError`` naming what differs::

    from pllm.testing.conformance import check_attention_backend
    check_attention_backend(MyBackend(), device="cuda", dtype=torch.float16)
"""

from __future__ import annotations

import torch

from pllm.core.interfaces import (
    AttentionBackend,
    Detection,
    KVCacheAllocator,
    Platform,
    PlatformCapabilities,
)
from pllm.testing.attention_checks import (
    DEFAULT_CASES,
    QUICK_CASES,
    AttentionCase,
    AttentionRun,
    check_attention_backend,
    check_attention_case,
    default_tolerances,
    metadata_to,
    run_attention_case,
)
from pllm.testing.cache_checks import (
    check_copy_blocks,
    check_kv_cache_allocator,
    check_write_kv,
    check_write_kv_fp8,
)
from pllm.testing.collectives import (
    check_communicator,
    check_communicator_rebuild,
    collectives_plan,
    free_tcp_init_method,
)
from pllm.testing.metadata import build_metadata, context_slot_mapping, num_blocks_needed
from pllm.testing.reference import reference_write_kv

__all__ = [
    "DEFAULT_CASES",
    "QUICK_CASES",
    "AttentionCase",
    "AttentionRun",
    "build_metadata",
    "check_attention_backend",
    "check_attention_case",
    "check_communicator",
    "check_communicator_rebuild",
    "check_copy_blocks",
    "check_detection",
    "check_kv_cache_allocator",
    "check_platform_basics",
    "check_write_kv",
    "check_write_kv_fp8",
    "collectives_plan",
    "context_slot_mapping",
    "default_tolerances",
    "float_dtypes",
    "free_tcp_init_method",
    "metadata_to",
    "num_blocks_needed",
    "reference_write_kv",
    "run_attention_case",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def float_dtypes(caps: PlatformCapabilities) -> list[torch.dtype]:
    """The attention dtypes a platform claims, in :data:`FLOAT_DTYPES` order."""
    return [dtype for dtype in FLOAT_DTYPES if caps.supports_dtype(dtype)]


def check_detection(platform_cls: type[Platform]) -> Detection:
    """``detect()`` returns a :class:`Detection` with an int score and a reason."""
    name = platform_cls.__name__
    detection = platform_cls.detect()
    assert isinstance(detection, Detection), f"{name}.detect() returned {detection!r}"
    assert type(detection.score) is int, f"{name}.detect() score {detection.score!r} is not an int"
    assert isinstance(detection.reason, str) and detection.reason.strip(), (
        f"{name}.detect() gave no reason"
    )
    return detection


def check_platform_basics(platform: Platform) -> None:
    """Capabilities, devices and factories have the contract's types."""
    name = type(platform).__name__
    caps = platform.capabilities
    assert isinstance(caps, PlatformCapabilities), f"{name}.capabilities is {caps!r}"
    assert caps.default_block_size in caps.block_sizes, f"{name}: {caps.default_block_size}"
    assert isinstance(platform.device(0), torch.device), f"{name}.device(0)"
    count = platform.device_count()
    assert isinstance(count, int) and count >= 1, f"{name}.device_count() = {count!r}"
    backend = platform.make_attention_backend()
    assert isinstance(backend, AttentionBackend), f"{name}.make_attention_backend() = {backend!r}"
    allocator = platform.make_kv_cache_allocator()
    assert isinstance(allocator, KVCacheAllocator), f"{name}.make_kv_cache_allocator()"
    assert callable(getattr(platform, "make_communicator", None)), f"{name}.make_communicator"
