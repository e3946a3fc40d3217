"""The platform conformance suite, shipped so a vendor can run it against
their own wheel::

    pllm platforms --check NAME
    pytest --pyargs pllm.testing.conformance_suite --pllm-platform NAME

Every check compares against the reference implementation or against
values computed independently; checks a platform's capabilities rule out
are skipped with the reason. The last one runs a tiny random Llama through
the whole engine on the platform and compares its greedy tokens with
transformers'.
"""

from __future__ import annotations

import pytest
import torch

from pllm.core.interfaces import Platform
from pllm.core.kv_cache.fp8 import FP8_DTYPES
from pllm.testing import conformance as cf
from pllm.testing.capture import check_decode_capturable
from pllm.testing.pytest_plugin import select_platform

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in cf.FLOAT_DTYPES]
KV_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in FP8_DTYPES]
CASES = [pytest.param(c, id=c.name) for c in cf.DEFAULT_CASES]


@pytest.fixture(scope="module")
def platform(request: pytest.FixtureRequest):
    """The platform under test, set up in this process as the engine sets
    up rank 0's (``setup_process``; ``teardown_process`` after)."""
    from pllm.core.config import EngineConfig

    platform = select_platform(request.config)
    platform.setup_process(EngineConfig(), 0)
    yield platform
    platform.teardown_process()


@pytest.fixture(scope="module")
def backend(platform: Platform):
    return platform.make_attention_backend()


def _require_dtype(platform: Platform, dtype: torch.dtype) -> None:
    if not platform.capabilities.supports_dtype(dtype):
        pytest.skip(f"{platform.name} does not claim {dtype}")


def test_detection(platform: Platform) -> None:
    detection = cf.check_detection(type(platform))
    assert detection.available, f"selected platform {platform.name} is unavailable: {detection}"


def test_platform_basics(platform: Platform) -> None:
    cf.check_platform_basics(platform)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_attention_matches_reference(platform, backend, case, dtype) -> None:
    _require_dtype(platform, dtype)
    why = case.applies_to(dtype) or case.supported_by(platform.capabilities)
    if why is not None:
        pytest.skip(why)
    cf.check_attention_case(backend, case, device=platform.device(0), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_skips_padding(platform, backend, dtype) -> None:
    _require_dtype(platform, dtype)
    cf.check_write_kv(
        backend,
        device=platform.device(0),
        dtype=dtype,
        block_size=min(platform.capabilities.block_sizes),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks(platform, backend, dtype) -> None:
    _require_dtype(platform, dtype)
    cf.check_copy_blocks(
        backend,
        device=platform.device(0),
        dtype=dtype,
        block_size=min(platform.capabilities.block_sizes),
    )


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_fp8_kv_cache(platform, backend, kv_dtype) -> None:
    """Quantizing writes, block copies and attention over an 8-bit cache (in
    the platform's default dtype), for each format the platform stores."""
    caps = platform.capabilities
    if not caps.supports_kv_cache_dtype(kv_dtype):
        pytest.skip(f"{platform.name} does not store the KV cache as {kv_dtype}")
    device, dtype = platform.device(0), caps.default_dtype
    block_size = min(caps.block_sizes)
    cf.check_write_kv_fp8(backend, kv_dtype, device=device, dtype=dtype, block_size=block_size)
    cf.check_copy_blocks(backend, device=device, dtype=dtype, block_size=block_size,
                         kv_cache_dtype=kv_dtype)
    skipped = cf.check_attention_backend(backend, device=device, dtype=dtype, capabilities=caps,
                                         kv_cache_dtype=kv_dtype)
    assert len(skipped) < len(cf.DEFAULT_CASES), f"every case skipped: {skipped}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_step_is_capturable(platform, backend, dtype) -> None:
    """A platform that records decode steps in graphs (``supports_graphs``)
    needs a backend whose decode step never reads back from the device."""
    caps = platform.capabilities
    if not caps.supports_graphs:
        pytest.skip(f"{platform.name} does not record decode steps in graphs")
    _require_dtype(platform, dtype)
    check_decode_capturable(backend, device=platform.device(0), dtype=dtype,
                            block_size=min(caps.block_sizes))


def test_kv_cache_allocator(platform: Platform) -> None:
    cf.check_kv_cache_allocator(
        platform.make_kv_cache_allocator(),
        device=platform.device(0),
        dtype=platform.capabilities.default_dtype,
    )


def test_communicator_close_then_rebuild(platform: Platform) -> None:
    """make_communicator -> all_reduce -> close -> make again, in this
    process: what a second engine in one process does."""
    cf.check_communicator_rebuild(platform)


def test_collectives_two_processes(platform: Platform) -> None:
    start_method, why = cf.collectives_plan(platform, world_size=2)
    if start_method is None:
        pytest.skip(why)
    cf.check_communicator(type(platform), world_size=2, start_method=start_method)


def test_tiny_llama_greedy_matches_transformers(platform: Platform, tmp_path) -> None:
    if not platform.capabilities.supports_dtype(torch.float32):
        pytest.skip(f"{platform.name} does not run fp32, which token-for-token parity needs")
    from pllm.testing.e2e import check_greedy_matches_transformers

    check_greedy_matches_transformers(platform, tmp_path)
