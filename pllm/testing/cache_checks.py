"""Checks of ``write_kv``, ``copy_blocks`` and a :class:`KVCacheAllocator`.

The cache layout belongs to the backend, so the cache checks never index
into it: they compare two caches built by the backend's own ``write_kv``
along two routes that must end in the same bytes.
"""

from __future__ import annotations

import torch

from pllm.core.config import CacheConfig
from pllm.core.interfaces import AttentionBackend, KVCacheAllocator
from pllm.core.kv_cache.fp8 import grid, round_trip, scale_kwargs


def _filled_cache(
    backend: AttentionBackend,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_blocks: int,
    block_size: int,
    device: torch.device | str,
    cache_dtype: torch.dtype | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """A cache whose every slot ``i`` holds ``keys[i]`` / ``values[i]``."""
    _, heads, dim = keys.shape
    shape = backend.kv_cache_shape(num_blocks, block_size, heads, dim)
    cache = torch.zeros(shape, dtype=cache_dtype or keys.dtype, device=device)
    backend.write_kv(keys, values, cache, torch.arange(num_blocks * block_size, device=device),
                     **scale_kwargs(cache.dtype, *scales))
    return cache


def _grid_step(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Distance from ``|x|`` (fp32, on the grid of ``dtype``) to the next
    representable magnitude below or above: one step of the format there."""
    _, min_exponent, mantissa_bits = grid(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**min_exponent)))
    return torch.exp2(exponent - mantissa_bits)


def check_write_kv_fp8(
    backend: AttentionBackend,
    kv_cache_dtype: torch.dtype,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int = 16,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    k_scale: float = 0.37,
    v_scale: float = 3.1,
    seed: int = 0,
) -> int:
    """Quantization by ``write_kv`` into an 8-bit cache, compared (layout
    agnostic) with the backend's write of the same values rounded by torch
    first: every element the same or one step of the format apart (rounding
    modes differ, e.g. under an interpreter), none inf or NaN, and values
    beyond the format's range saturated to exactly its largest finite value.
    Returns how many elements were one step apart."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 2
    num_slots = num_blocks * block_size
    fmax = torch.finfo(kv_cache_dtype).max
    where = f"{type(backend).__name__}.write_kv ({dtype} into {kv_cache_dtype}, {device})"

    def draw(scale: float) -> torch.Tensor:
        return (torch.randn(num_slots, num_kv_heads, head_dim, generator=gen) * scale * 4).to(dtype)

    def fill(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _filled_cache(backend, k.to(device), v.to(device), num_blocks, block_size, device,
                             kv_cache_dtype, (k_scale, v_scale)).float().cpu()

    keys, values = draw(k_scale), draw(v_scale)
    got = fill(keys, values)
    want = fill(round_trip(keys, k_scale, kv_cache_dtype),
                round_trip(values, v_scale, kv_cache_dtype))
    assert torch.isfinite(got).all(), f"{where}: inf or NaN stored"
    diff = (got - want).abs()
    far = diff > _grid_step(torch.maximum(got.abs(), want.abs()), kv_cache_dtype)
    assert not far.any(), (
        f"{where}: {int(far.sum())} elements more than one step from torch's rounding "
        f"(worst {float(diff.max())})")

    # Twice the range (inf where ``dtype`` cannot hold that): exactly +-max stored.
    signs = torch.randn(2, num_slots, num_kv_heads, head_dim, generator=gen).sign()
    big = fill((signs[0] * 2 * fmax * k_scale).to(dtype), (signs[1] * 2 * fmax * v_scale).to(dtype))
    assert bool((big.abs() == fmax).all()), f"{where}: out-of-range values not saturated to {fmax}"
    assert int((big > 0).sum()) == int((signs > 0).sum()), f"{where}: saturation lost signs"

    # -0 and negatives that round to zero: zero, never NaN (0x80 is NaN in the fnuz formats).
    tiny = -torch.rand(num_slots, num_kv_heads, head_dim, generator=gen) * 1e-7
    tiny[0] = -0.0
    zeros = fill((tiny * k_scale).to(dtype), (tiny * v_scale).to(dtype))
    assert bool((zeros == 0).all()), (
        f"{where}: -0 or a negative below the format's smallest value stored as "
        f"{zeros[zeros != 0].unique()[:4].tolist()}, not zero")
    return int((diff > 0).sum())


def check_write_kv(
    backend: AttentionBackend,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int = 16,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    seed: int = 0,
) -> None:
    """Negative (padding) slots are skipped; valid ones land where a write of
    the valid tokens alone puts them."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 4
    num_slots = num_blocks * block_size

    def rand(n: int) -> torch.Tensor:
        return torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)

    base = _filled_cache(backend, rand(num_slots), rand(num_slots), num_blocks, block_size, device)
    where = f"{type(backend).__name__}.write_kv ({dtype}, {device})"

    padding = torch.tensor([-1, -1, -7], device=device)
    cache = base.clone()
    backend.write_kv(rand(3), rand(3), cache, padding)
    blocks = backend.block_storage
    assert torch.equal(blocks(cache), blocks(base)), f"{where}: an all-padding write changed a block"

    valid = torch.randperm(num_slots, generator=gen)[:5]
    slots = torch.tensor(
        [int(valid[0]), -1, int(valid[1]), int(valid[2]), -1, -1, int(valid[3]), -7, int(valid[4])],
        device=device,
    )
    keys, values = rand(len(slots)), rand(len(slots))
    mixed = base.clone()
    backend.write_kv(keys, values, mixed, slots)
    keep = slots >= 0
    only_valid = base.clone()
    backend.write_kv(keys[keep], values[keep], only_valid, slots[keep])
    assert not torch.equal(only_valid, base), f"{where}: writing 5 tokens changed nothing"
    assert torch.equal(blocks(mixed), blocks(only_valid)), f"{where}: padding slots were not skipped"


def check_copy_blocks(
    backend: AttentionBackend,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int = 16,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    kv_cache_dtype: torch.dtype | None = None,
) -> None:
    """``copy_blocks`` copies whole blocks in every layer (one source may feed
    several destinations) and leaves everything else alone, bit for bit
    (caches in ``dtype``, or in ``kv_cache_dtype`` when given)."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 8
    num_slots = num_blocks * block_size
    pairs = [(1, 5), (6, 2), (1, 7)]
    where = f"{type(backend).__name__}.copy_blocks ({kv_cache_dtype or dtype}, {device})"
    data = [
        [
            torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
            for _ in range(2)
        ]
        for _ in range(num_layers)
    ]
    caches = [_filled_cache(backend, k, v, num_blocks, block_size, device, kv_cache_dtype)
              for k, v in data]
    before = [c.clone() for c in caches]
    backend.copy_blocks(caches, [])
    assert all(_same_bits(a, b) for a, b in zip(caches, before, strict=True)), (
        f"{where}: [] changed caches"
    )

    backend.copy_blocks(caches, pairs)
    for layer, (keys, values) in enumerate(data):
        keys, values = keys.clone(), values.clone()
        for src, dst in pairs:
            s, d = (
                slice(src * block_size, (src + 1) * block_size),
                slice(dst * block_size, (dst + 1) * block_size),
            )
            keys[d], values[d] = keys[s], values[s]
        expected = _filled_cache(backend, keys, values, num_blocks, block_size, device,
                                 kv_cache_dtype)
        assert _same_bits(caches[layer], expected), f"{where}: layer {layer} differs"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` has no fp8 kernel on the CPU)."""
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def check_kv_cache_allocator(
    allocator: KVCacheAllocator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> None:
    """``num_blocks`` honours the byte budget (``kv_cache_memory``) and finds
    room for a block without one; ``allocate`` returns distinct zeroed
    tensors of the asked shape, dtype and device. (``num_blocks_override``
    is the core's business: allocators never see it applied.)"""
    name = type(allocator).__name__
    bytes_per_block = 4096
    budget = 10 * bytes_per_block + 123
    got = allocator.num_blocks(CacheConfig(kv_cache_memory=budget), bytes_per_block)
    assert isinstance(got, int), f"{name}.num_blocks returned {got!r}, not an int"
    assert 1 <= got <= 10, (
        f"{name}.num_blocks: {got} blocks of {bytes_per_block} B for a budget of {budget} B "
        f"(kv_cache_memory); want between 1 and 10"
    )
    got = allocator.num_blocks(CacheConfig(), bytes_per_block)
    assert isinstance(got, int) and got >= 1, (
        f"{name}.num_blocks found no room for one {bytes_per_block} B block "
        f"(no kv_cache_memory given): {got!r}"
    )

    shape = (2, 3, 16, 2, 8)
    tensors = allocator.allocate(3, shape, dtype, torch.device(device))
    assert len(tensors) == 3, f"{name}.allocate(3 layers) returned {len(tensors)} tensors"
    for t in tensors:
        assert tuple(t.shape) == shape and t.dtype == dtype, f"{name}: {t.shape}, {t.dtype}"
        assert t.device.type == torch.device(device).type, f"{name}: tensor on {t.device}"
        assert not t.any(), f"{name}.allocate returned a tensor that is not zeroed"
    tensors[0].fill_(1)  # layers must not share memory (data_ptr means nothing on XLA)
    assert not tensors[1].any() and not tensors[2].any(), f"{name}.allocate: layers share memory"
