"""Attention backend vs :func:`reference_attention`, layout-agnostic.

The backend writes K/V into its own cache layout through ``write_kv``; the
same values go into a reference cache in the CPU layout, and both
attentions must agree. Every slot first holds large random "garbage", so a
backend that reads past a sequence's length, outside its sliding window or
from a stale block produces a visible error instead of a lucky zero.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata, PlatformCapabilities
from pllm.core.kv_cache.fp8 import is_fp8, round_trip, scale_kwargs
from pllm.platforms.cpu.attention import reference_attention
from pllm.testing.metadata import build_metadata, context_slot_mapping, num_blocks_needed

GARBAGE_SCALE = 30.0


@dataclass(frozen=True)
class AttentionCase:
    """One batch shape: ``seqs`` is ``(cached_len, query_len)`` per sequence,
    decodes (query_len 1 with context) first."""

    name: str
    seqs: tuple[tuple[int, int], ...]
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    sliding_window: int | None = None

    def supported_by(self, caps: PlatformCapabilities) -> str | None:
        """``None`` if ``caps`` allow this case, else why not."""
        if not caps.supports_head_dim(self.head_dim):
            return f"head_dim {self.head_dim} not in {caps.head_dims}"
        if not caps.supports_block_size(self.block_size):
            return f"block_size {self.block_size} not in {caps.block_sizes}"
        if self.sliding_window is not None and not caps.supports_sliding_window:
            return "no sliding window support"
        return None


# Small on purpose: interpreted kernels (TRITON_INTERPRET=1, Pallas interpret) are slow.
DEFAULT_CASES: tuple[AttentionCase, ...] = (
    AttentionCase("prefill_uneven_gqa", ((0, 5), (0, 17), (0, 1))),
    AttentionCase(  # seq_lens 16, 17, 32, 33, 4: on and across block edges
        "decode_block_edges_mqa", ((15, 1), (16, 1), (31, 1), (32, 1), (3, 1)), num_kv_heads=1
    ),
    AttentionCase(  # decodes, then prefill chunks with and without cached context
        "mixed_chunks_mha",
        ((16, 1), (7, 1), (0, 9), (16, 16), (5, 12)),
        num_heads=2,
        num_kv_heads=2,
    ),
    AttentionCase(
        "mixed_sliding_window_gqa", ((20, 1), (9, 1), (12, 10), (0, 19)), sliding_window=8
    ),
    AttentionCase(
        "decode_sliding_window_mqa", ((40, 1), (6, 1)), num_kv_heads=1, sliding_window=16
    ),
    AttentionCase("block_size_32_gqa", ((31, 1), (0, 33), (32, 8)), block_size=32),
)
QUICK_CASES: tuple[AttentionCase, ...] = (DEFAULT_CASES[2], DEFAULT_CASES[3])

_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` against the fp32 reference for outputs in ``dtype``."""
    if dtype not in _TOLERANCES:
        raise ValueError(f"no default tolerance for {dtype}; known: {list(_TOLERANCES)}")
    return _TOLERANCES[dtype]


def metadata_to(metadata: AttentionMetadata, device: torch.device | str) -> AttentionMetadata:
    """A copy of ``metadata`` with its tensors on ``device``."""
    moved = {
        f.name: getattr(metadata, f.name).to(device)
        for f in dataclasses.fields(metadata)
        if isinstance(getattr(metadata, f.name), torch.Tensor)
    }
    return dataclasses.replace(metadata, extras=dict(metadata.extras), **moved)


def reference_write_kv(
    key: torch.Tensor, value: torch.Tensor, ref_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write into a CPU-layout cache ``[2, blocks, block_size, heads, dim]``,
    skipping negative slots: the obvious version backends are compared with."""
    flat = ref_cache.view(2, -1, *ref_cache.shape[3:])
    keep = slots >= 0
    flat[0][slots[keep]] = key[keep].to(ref_cache.dtype)
    flat[1][slots[keep]] = value[keep].to(ref_cache.dtype)


def check_attention_case(
    backend: AttentionBackend,
    case: AttentionCase,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    kv_cache_dtype: torch.dtype | None = None,
    k_scale: float = 0.5,
    v_scale: float = 2.0,
) -> None:
    """Raise ``AssertionError`` unless ``backend`` matches the reference on ``case``.

    ``kv_cache_dtype`` (default: ``dtype``) may be an 8-bit float; then K/V
    are drawn already on that format's grid times the scales (powers of two,
    so the division in ``write_kv`` is exact whatever its rounding), and the
    reference sees exactly the values the backend must store."""
    kv_dtype = kv_cache_dtype or dtype
    scales = scale_kwargs(kv_dtype, k_scale, v_scale)
    default_atol, default_rtol = default_tolerances(dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    gen = torch.Generator().manual_seed(seed)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    num_blocks = 2 * num_blocks_needed(case.seqs, bs)
    md_cpu = build_metadata(case.seqs, bs, num_blocks, generator=gen)
    md = backend.prepare_metadata(metadata_to(md_cpu, device))

    cache = torch.zeros(backend.kv_cache_shape(num_blocks, bs, hkv, d), dtype=kv_dtype,
                        device=device)
    ref_cache = torch.zeros(2, num_blocks, bs, hkv, d)

    def draw(n: int, size: float, kv_scale: float) -> torch.Tensor:
        x = torch.randn(n, hkv, d, generator=gen) * size
        if is_fp8(kv_dtype):
            x = round_trip(x, kv_scale, kv_dtype)
        return x.to(dtype)

    def write(slots: torch.Tensor, size: float = 1.0) -> None:
        k, v = draw(len(slots), size, k_scale), draw(len(slots), size, v_scale)
        backend.write_kv(k.to(device), v.to(device), cache, slots.to(device), **scales)
        reference_write_kv(k.float(), v.float(), ref_cache, slots)

    write(torch.arange(num_blocks * bs), GARBAGE_SCALE)  # stale data everywhere
    write(context_slot_mapping(md_cpu))  # written by earlier steps
    write(md_cpu.slot_mapping)  # this step's tokens

    query = torch.randn(md_cpu.num_tokens, case.num_heads, d, generator=gen).to(dtype)
    scale = d**-0.5
    out = backend.forward(
        query.to(device), cache, md, scale=scale, sliding_window=case.sliding_window, **scales
    )
    expected = reference_attention(
        query.float(), ref_cache, md_cpu, scale=scale, sliding_window=case.sliding_window
    )
    cache_note = f", {kv_dtype} cache" if kv_dtype != dtype else ""
    where = f"{type(backend).__name__} on case {case.name!r} ({dtype}{cache_note}, {device})"
    assert tuple(out.shape) == tuple(query.shape), f"{where}: output shape {tuple(out.shape)}"
    assert out.dtype == dtype, f"{where}: output dtype {out.dtype}"
    assert out.device.type == torch.device(device).type, f"{where}: output on {out.device}"
    torch.testing.assert_close(
        out.float().cpu(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}"
    )


def check_attention_backend(
    backend: AttentionBackend,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    atol: float | None = None,
    rtol: float | None = None,
    cases: Sequence[AttentionCase] = DEFAULT_CASES,
    capabilities: PlatformCapabilities | None = None,
    seed: int = 0,
    kv_cache_dtype: torch.dtype | None = None,
) -> list[str]:
    """Run every case ``capabilities`` allow (all when ``None``); raise
    ``AssertionError`` on the first mismatch. Returns the names of cases skipped
    because the capabilities rule them out, with why."""
    skipped = []
    for case in cases:
        why = case.supported_by(capabilities) if capabilities is not None else None
        if why is not None:
            skipped.append(f"{case.name}: {why}")
            continue
        check_attention_case(
            backend, case, device=device, dtype=dtype, atol=atol, rtol=rtol, seed=seed,
            kv_cache_dtype=kv_cache_dtype,
        )
    return skipped
