"""Attention backend vs :func:`reference_attention`, layout-agnostic: the one
attention harness of pllm (the conformance suite and the Triton self-check
both run their cases through :func:`run_attention_case`).

The backend writes K/V into its own cache layout through ``write_kv``; the
same values go into a cache in the reference layout, and both attentions
must agree. Every slot first holds large random "garbage", so a backend that
reads past a sequence's length, outside its sliding window or from a stale
block produces a visible error instead of a lucky zero.

A case is a batch of ``(cached_len, query_len)`` per sequence, decodes
first. Besides the shape it can ask for:

* a softmax ``scale`` other than ``head_dim ** -0.5`` (a backend that
  ignores the ``scale`` argument fails);
* ``large_logits``: scores around 1e5 whose differences are of order one,
  all exact in fp32. A softmax computed in fp16 overflows (NaN), one in bf16
  rounds the differences away; an fp32 softmax passes;
* ``fused_qkv``: the step's q/k/v are strided views of one tensor, as a
  fused QKV projection leaves them;
* an 8-bit cache (``kv_cache_dtype``) with K/V drawn on its grid times the
  scales, so the reference sees exactly what the backend must store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pllm.core.interfaces import AttentionBackend, AttentionMetadata, PlatformCapabilities
from pllm.core.kv_cache.fp8 import is_fp8, round_trip, scale_kwargs
from pllm.testing.metadata import build_metadata, context_slot_mapping, num_blocks_needed
from pllm.testing.reference import (
    reference_attention,
    reference_kv_cache_shape,
    reference_write_kv,
)

GARBAGE_SCALE = 30.0

# (atol, rtol) of a backend's output against the fp32 reference, by the
# dtype of the query and output. The one table for every backend: 16-bit
# kernels round P to the input dtype before P @ V, as every flash kernel
# does, and long contexts (the GPU's large cases) accumulate more of that.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}
# Large-logit cases: scores near 1e5 are exact in fp32, but a kernel that
# folds ``scale * log2(e)`` into them (exp2-based softmax) rounds them at
# fp32's step there (1/128); that costs about 1% of a probability. A softmax
# in fp16 (NaN) or bf16 (every score rounded to a multiple of 512: a
# uniform average) is off by far more.
LARGE_LOGIT_TOLERANCE = (2e-2, 2e-2)
# The score offset of large-logit cases: query dim 0 times key dim 0 times
# the scale 1/8 (head_dim 64), each a small power-of-two multiple, so the
# product is exact in every float format; above fp16's largest finite 65504.
_LARGE_Q0, _LARGE_K0 = 6144.0, 128.0  # 6144 * 128 / 8 = 98304


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` against the fp32 reference for outputs in ``dtype``."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no default tolerance for {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


@dataclass(frozen=True)
class AttentionCase:
    """One batch: ``seqs`` is ``(cached_len, query_len)`` per sequence,
    decodes (query_len 1 with context) first."""

    name: str
    seqs: tuple[tuple[int, int], ...]
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    sliding_window: int | None = None
    soft_cap: float | None = None  # attention logit soft-cap (Gemma 2)
    # How many leading sequences are decodes; None: those with query_len 1
    # and some cached context (a one-token sequence may be a decode too).
    num_decodes: int | None = None
    scale: float | None = None  # None: head_dim ** -0.5
    large_logits: bool = False  # fp32 queries only; see the module docstring
    fused_qkv: bool = False
    # An 8-bit cache format by torch name ("float8_e4m3fn", ...); None: the
    # caller's kv_cache_dtype, else the query dtype.
    kv_cache_dtype: str | None = None
    k_scale: float = 0.5
    v_scale: float = 2.0

    @classmethod
    def from_lengths(
        cls,
        name: str,
        *,
        decode_lens: Sequence[int] = (),
        prefills: Sequence[tuple[int, int]] = (),
        **fields,
    ) -> AttentionCase:
        """A case from the ``seq_len`` of each decode and the
        ``(query_len, seq_len)`` of each prefill chunk."""
        for q, s in prefills:
            if not 1 <= q <= s:
                raise ValueError(f"case {name}: need 1 <= query_len <= seq_len, got {(q, s)}")
        seqs = tuple((n - 1, 1) for n in decode_lens) + tuple((s - q, q) for q, s in prefills)
        return cls(name, seqs, num_decodes=len(decode_lens), **fields)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale is None else self.scale

    def supported_by(self, caps: PlatformCapabilities) -> str | None:
        """``None`` if ``caps`` allow this case, else why not."""
        if not caps.supports_head_dim(self.head_dim):
            return f"head_dim {self.head_dim} not in {caps.head_dims}"
        if not caps.supports_block_size(self.block_size):
            return f"block_size {self.block_size} not in {caps.block_sizes}"
        if self.sliding_window is not None and not caps.supports_sliding_window:
            return "no sliding window support"
        if self.soft_cap is not None and not caps.supports_soft_cap:
            return "no attention soft-cap support"
        if self.kv_cache_dtype and not caps.supports_kv_cache_dtype(
            getattr(torch, self.kv_cache_dtype)
        ):
            return f"no {self.kv_cache_dtype} KV cache"
        if self.large_logits and not caps.supports_dtype(torch.float32):
            return "large logits are checked with fp32 queries"
        return None

    def applies_to(self, dtype: torch.dtype, kv_cache_dtype: torch.dtype | None = None) -> str | None:
        """``None`` if the case runs with queries in ``dtype`` (and a cache in
        ``kv_cache_dtype``), else why not."""
        if self.large_logits and dtype != torch.float32:
            return "large logits are checked with fp32 queries (they overflow fp16)"
        if self.large_logits and (kv_cache_dtype not in (None, dtype) or self.kv_cache_dtype):
            return "large logits are checked with an fp32 cache"
        return None


def _case(name: str, seqs, **fields) -> AttentionCase:
    return AttentionCase(name, seqs, **fields)


# Small on purpose: interpreted kernels (TRITON_INTERPRET=1, Pallas interpret) are slow.
DEFAULT_CASES: tuple[AttentionCase, ...] = (
    _case("prefill_uneven_gqa", ((0, 5), (0, 17), (0, 1))),
    _case(  # seq_lens 16, 17, 32, 33, 4: on and across block edges
        "decode_block_edges_mqa", ((15, 1), (16, 1), (31, 1), (32, 1), (3, 1)), num_kv_heads=1
    ),
    _case(  # decodes, then prefill chunks with and without cached context
        "mixed_chunks_mha",
        ((16, 1), (7, 1), (0, 9), (16, 16), (5, 12)),
        num_heads=2,
        num_kv_heads=2,
    ),
    _case("mixed_sliding_window_gqa", ((20, 1), (9, 1), (12, 10), (0, 19)), sliding_window=8),
    _case("decode_sliding_window_mqa", ((40, 1), (6, 1)), num_kv_heads=1, sliding_window=16),
    _case("block_size_32_gqa", ((31, 1), (0, 33), (32, 8)), block_size=32),
    # A scale that is not head_dim ** -0.5 (models set their own, e.g. Gemma).
    _case("custom_scale_gqa", ((20, 1), (0, 7), (9, 12)), scale=0.37),
    _case("large_logits_gqa", ((20, 1), (0, 9), (12, 10)), large_logits=True),
    # Soft-capped logits (Gemma 2): a cap near the scores' spread, so it bends them.
    _case("soft_cap_mixed_gqa", ((15, 1), (32, 1), (0, 17), (16, 9)), soft_cap=1.5),
    _case("soft_cap_sliding_window_mqa", ((24, 1), (10, 12)), num_kv_heads=1, sliding_window=8,
          soft_cap=3.0, scale=0.3),
)
QUICK_CASES: tuple[AttentionCase, ...] = (DEFAULT_CASES[2], DEFAULT_CASES[3])


def metadata_to(metadata: AttentionMetadata, device: torch.device | str) -> AttentionMetadata:
    """A copy of ``metadata`` with its tensors on ``device``."""
    moved = {
        f.name: getattr(metadata, f.name).to(device)
        for f in dataclasses.fields(metadata)
        if isinstance(getattr(metadata, f.name), torch.Tensor)
    }
    return dataclasses.replace(metadata, extras=dict(metadata.extras), **moved)


@dataclass
class AttentionRun:
    """What one case produced, for callers that check more than the output
    (the Triton self-check compares the cache itself, its layout being the
    reference's)."""

    case: AttentionCase
    dtype: torch.dtype
    kv_cache_dtype: torch.dtype
    metadata: AttentionMetadata  # on the device, after prepare_metadata
    query: torch.Tensor  # on the device
    cache: torch.Tensor  # the backend's, after every write
    ref_cache: torch.Tensor  # the reference layout, fp32, on the CPU
    out: torch.Tensor  # the backend's, on the CPU
    out_device: torch.device  # where the backend returned it
    expected: torch.Tensor  # the reference's, fp32, on the CPU
    atol: float
    rtol: float

    @property
    def where(self) -> str:
        cache_note = f", {self.kv_cache_dtype} cache" if self.kv_cache_dtype != self.dtype else ""
        return f"case {self.case.name!r} ({self.dtype}{cache_note}, {self.query.device})"

    @property
    def max_abs_err(self) -> float:
        err = (self.out.float() - self.expected).abs()
        return float(err.nan_to_num(float("inf")).max()) if err.numel() else 0.0

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.out).all())

    def mismatch(self) -> str | None:
        """``None`` if the output matches the reference, else what differs."""
        if tuple(self.out.shape) != tuple(self.query.shape):
            return f"output shape {tuple(self.out.shape)}, want {tuple(self.query.shape)}"
        if self.out.dtype != self.dtype:
            return f"output dtype {self.out.dtype}, want {self.dtype}"
        try:
            torch.testing.assert_close(self.out.float(), self.expected, atol=self.atol,
                                       rtol=self.rtol)
        except AssertionError as exc:
            return str(exc)
        return None


def _grid_values(n: int, hkv: int, d: int, levels: torch.Tensor, gen: torch.Generator):
    """Random values among ``levels`` (multiples of 1/2): sums of their
    products are exact in fp32 whatever the order."""
    return levels[torch.randint(len(levels), (n, hkv, d), generator=gen)]


def _generator_on(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device``, or on the host where the device has none (XLA)."""
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:
        return torch.Generator().manual_seed(seed)


def _randn(shape, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device).to(device)


def run_attention_case(
    backend: AttentionBackend,
    case: AttentionCase,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    kv_cache_dtype: torch.dtype | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
    spare_blocks: int | None = None,
) -> AttentionRun:
    """Run ``case`` through ``backend`` and the reference; raises nothing
    about the result (see :meth:`AttentionRun.mismatch`).

    ``kv_cache_dtype`` (default: the case's, else ``dtype``) may be an 8-bit
    float; then K/V are drawn already on that format's grid times the scales
    (powers of two, so the division in ``write_kv`` is exact whatever its
    rounding). ``spare_blocks`` (default: as many as the batch uses, at most
    64) are cache blocks no sequence owns: garbage a backend must not read.
    """
    why = case.applies_to(dtype, kv_cache_dtype)
    if why is not None:
        raise ValueError(f"case {case.name!r}: {why}")
    device = torch.device(device)
    if kv_cache_dtype is None:
        kv_cache_dtype = getattr(torch, case.kv_cache_dtype) if case.kv_cache_dtype else dtype
    k_scale = case.k_scale if k_scale is None else k_scale
    v_scale = case.v_scale if v_scale is None else v_scale
    scales = scale_kwargs(kv_cache_dtype, k_scale, v_scale)
    default_atol, default_rtol = (LARGE_LOGIT_TOLERANCE if case.large_logits
                                  else default_tolerances(dtype))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol

    # Small, host-side choices (block tables) from a CPU generator; the bulk
    # data from one on the device, made in place (the GPU's large cases).
    gen = torch.Generator().manual_seed(seed)
    data_gen = _generator_on(device, seed)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    needed = num_blocks_needed(case.seqs, bs)
    num_blocks = needed + (min(needed, 64) if spare_blocks is None else spare_blocks)
    md_cpu = build_metadata(case.seqs, bs, num_blocks, generator=gen,
                            num_decodes=case.num_decodes)
    md = backend.prepare_metadata(metadata_to(md_cpu, device))

    cache = torch.zeros(backend.kv_cache_shape(num_blocks, bs, hkv, d), dtype=kv_cache_dtype,
                        device=device)
    ref_cache = torch.zeros(reference_kv_cache_shape(num_blocks, bs, hkv, d))

    def draw(n: int, size: float, kv_scale: float) -> torch.Tensor:
        x = _randn((n, hkv, d), data_gen, device) * size
        if is_fp8(kv_cache_dtype):
            x = round_trip(x, kv_scale, kv_cache_dtype)
        return x.to(dtype)

    levels_k = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    levels_q = torch.arange(-4, 5) / 2.0  # -2 .. 2

    def draw_kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if case.large_logits:  # on a grid, with a large constant in dim 0
            k = _grid_values(n, hkv, d, levels_k, gen)
            k[..., 0] = _LARGE_K0
            v = torch.randn(n, hkv, d, generator=gen)
            return k.to(device), v.to(device)
        return draw(n, 1.0, k_scale), draw(n, 1.0, v_scale)

    def write(slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        backend.write_kv(k, v, cache, slots.to(device), **scales)
        reference_write_kv(k.float().cpu(), v.float().cpu(), ref_cache, slots.cpu())

    # Stale data everywhere, then what earlier steps wrote, then this step.
    all_slots = torch.arange(num_blocks * bs)
    write(all_slots, draw(len(all_slots), GARBAGE_SCALE, k_scale),
          draw(len(all_slots), GARBAGE_SCALE, v_scale))
    context = context_slot_mapping(md_cpu)
    write(context, *draw_kv(len(context)))

    n, h = md_cpu.num_tokens, case.num_heads
    if case.large_logits:
        query = _grid_values(n, h, d, levels_q, gen)
        query[..., 0] = _LARGE_Q0
        query = query.to(device)
    else:
        query = _randn((n, h, d), data_gen, device).to(dtype)
    key, value = draw_kv(n)
    if case.fused_qkv:  # strided views into one [tokens, (h + 2 hkv) d] tensor
        qkv = torch.cat([query.flatten(1), key.flatten(1), value.flatten(1)], dim=1)
        query = qkv[:, : h * d].view(n, h, d)
        key = qkv[:, h * d : (h + hkv) * d].view(n, hkv, d)
        value = qkv[:, (h + hkv) * d :].view(n, hkv, d)
    write(md_cpu.slot_mapping, key, value)

    scale = case.softmax_scale
    # Passed only when set, as the model layers do.
    cap = {} if case.soft_cap is None else {"soft_cap": case.soft_cap}
    out = backend.forward(query, cache, md, scale=scale, sliding_window=case.sliding_window,
                          **scales, **cap)
    # The reference cache holds real (dequantized) values: no scales for it.
    expected = reference_attention(query.float().cpu(), ref_cache, md_cpu, scale=scale,
                                   sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    return AttentionRun(case=case, dtype=dtype, kv_cache_dtype=kv_cache_dtype, metadata=md,
                        query=query, cache=cache, ref_cache=ref_cache, out=out.cpu(),
                        out_device=out.device,
                        expected=expected, atol=atol, rtol=rtol)


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
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> AttentionRun:
    """Raise ``AssertionError`` unless ``backend`` matches the reference on
    ``case`` (see :func:`run_attention_case` for the arguments)."""
    run = run_attention_case(backend, case, device=device, dtype=dtype, atol=atol, rtol=rtol,
                             seed=seed, kv_cache_dtype=kv_cache_dtype, k_scale=k_scale,
                             v_scale=v_scale)
    problem = run.mismatch()
    if problem is None and run.out_device.type != torch.device(device).type:
        problem = f"output on {run.out_device}"
    assert problem is None, f"{type(backend).__name__} on {run.where}: {problem}"
    return run


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
    """Run every case ``capabilities`` allow (all when ``None``) and that
    applies to ``dtype``; raise ``AssertionError`` on the first mismatch.
    Returns the names of the cases skipped, with why."""
    skipped = []
    for case in cases:
        why = case.applies_to(dtype, kv_cache_dtype)
        if why is None and capabilities is not None:
            why = case.supported_by(capabilities)
        if why is not None:
            skipped.append(f"{case.name}: {why}")
            continue
        check_attention_case(
            backend, case, device=device, dtype=dtype, atol=atol, rtol=rtol, seed=seed,
            kv_cache_dtype=kv_cache_dtype,
        )
    return skipped

