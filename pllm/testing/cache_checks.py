"""Checks of ``write_kv``, ``copy_blocks`` and a :class:`KVCacheAllocator`.

The cache layout belongs to the backend, so the cache checks never index
into it: they compare two caches built by the backend's own ``write_kv``
along two routes that must end in the same bytes.
"""

from __future__ import annotations

import torch

from pllm.core.config import CacheConfig
from pllm.core.interfaces import AttentionBackend, KVCacheAllocator, MemoryInfo


def _filled_cache(
    backend: AttentionBackend,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_blocks: int,
    block_size: int,
    device: torch.device | str,
) -> torch.Tensor:
    """A cache whose every slot ``i`` holds ``keys[i]`` / ``values[i]``."""
    _, heads, dim = keys.shape
    shape = backend.kv_cache_shape(num_blocks, block_size, heads, dim)
    cache = torch.zeros(shape, dtype=keys.dtype, device=device)
    backend.write_kv(keys, values, cache, torch.arange(num_blocks * block_size, device=device))
    return cache


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
    assert torch.equal(cache, base), f"{where}: an all-padding write changed the cache"

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
    assert torch.equal(mixed, only_valid), f"{where}: padding slots were not skipped"


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
) -> None:
    """``copy_blocks`` copies whole blocks in every layer (one source may feed
    several destinations) and leaves everything else alone."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 8
    num_slots = num_blocks * block_size
    pairs = [(1, 5), (6, 2), (1, 7)]
    where = f"{type(backend).__name__}.copy_blocks ({dtype}, {device})"
    data = [
        [
            torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
            for _ in range(2)
        ]
        for _ in range(num_layers)
    ]
    caches = [_filled_cache(backend, k, v, num_blocks, block_size, device) for k, v in data]
    before = [c.clone() for c in caches]
    backend.copy_blocks(caches, [])
    assert all(torch.equal(a, b) for a, b in zip(caches, before, strict=True)), (
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
        expected = _filled_cache(backend, keys, values, num_blocks, block_size, device)
        assert torch.equal(caches[layer], expected), f"{where}: layer {layer} differs"


def check_kv_cache_allocator(
    allocator: KVCacheAllocator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory_info: MemoryInfo | None = None,
) -> None:
    """``num_blocks`` honours the override and the byte budget; ``allocate``
    returns distinct zeroed tensors of the asked shape, dtype and device."""
    name = type(allocator).__name__
    bytes_per_block = 4096
    got = allocator.num_blocks(CacheConfig(num_blocks_override=7), bytes_per_block)
    assert got == 7, f"{name}.num_blocks ignored num_blocks_override=7: {got}"
    budget = 10 * bytes_per_block + 123
    got = allocator.num_blocks(CacheConfig(kv_cache_memory=budget), bytes_per_block)
    assert 1 <= got <= 10, (
        f"{name}.num_blocks: {got} blocks of {bytes_per_block} B exceed {budget} B"
    )
    got = allocator.num_blocks(CacheConfig(), bytes_per_block)
    assert got >= 1, f"{name}.num_blocks found no room for one {bytes_per_block} B block"
    if memory_info is not None:
        assert got * bytes_per_block <= memory_info.total_bytes, (
            f"{name}.num_blocks: {got} blocks exceed the device's {memory_info.total_bytes} B"
        )

    shape = (2, 3, 16, 2, 8)
    tensors = allocator.allocate(3, shape, dtype, torch.device(device))
    assert len(tensors) == 3, f"{name}.allocate(3 layers) returned {len(tensors)} tensors"
    for t in tensors:
        assert tuple(t.shape) == shape and t.dtype == dtype, f"{name}: {t.shape}, {t.dtype}"
        assert t.device.type == torch.device(device).type, f"{name}: tensor on {t.device}"
        assert not t.any(), f"{name}.allocate returned a tensor that is not zeroed"
    assert len({t.data_ptr() for t in tensors}) == 3, f"{name}.allocate: layers share memory"
