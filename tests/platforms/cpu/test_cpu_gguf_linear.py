"""The GGUF linear kernel against ``x @ dequantize(W).T`` in fp64, for every
format, ISA path this host runs (forced) and activation mode, on odd output
sizes and every row count around the few-row / tiled switch.

Tolerances, with ``S = |x| @ |W|.T`` (the sum of the absolute products):
- fp32 activations: ``2**-16 * S`` (128 fp32 ulps of S: the sums are split
  over 8 lanes and a few accumulators, so they run at most K / 8 deep; a
  single wrong weight costs about S / K, over 40 times more at K = 1536).
- q8 activations: x is rounded to ``dx * round(x / dx)``, ``dx = amax / 127``
  per 32-element block, so each element moves by at most ``amax / 254`` and
  the output by at most ``sum over blocks of amax / 254 * sum |w|`` in that
  block; the integer dot products are exact; the fp32 tolerance comes on top.
"""

from __future__ import annotations

import functools
import shutil

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

import pllm.platforms.cpu.gguf_linear as gl

T = GGMLQuantizationType
_QUANTIZABLE = (T.Q8_0, T.Q4_0, T.Q4_1)  # the gguf package quantizes these; the K-quants get random blocks
ROWS = (1, 2, 3, 7, 8, 9, 33, 128)
OUT_FEATURES = (1, 17, 77, 576)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the torch fallback is used")


def _in_features(qtype) -> tuple[int, ...]:
    return (32, 576, 1536) if GGML_QUANT_SIZES[qtype][0] == 32 else (256, 768, 1536)


def _shapes(qtype):
    """Every row count, each with an output size and input size in turn."""
    ks = _in_features(qtype)
    return [(m, OUT_FEATURES[i % 4], ks[i % 3]) for i, m in enumerate(ROWS)] + [(1, 576, 1536), (9, 77, ks[1])]


@functools.cache
def _weight(qtype, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw blocks uint8 [n, row_bytes], their fp64 dequantization)."""
    rng = np.random.default_rng(n * 7919 + k + int(qtype))
    if qtype in _QUANTIZABLE:
        raw = quantize(rng.standard_normal((n, k), dtype=np.float32), qtype)
    else:  # random quants and scales; small positive fp16 super-block scales
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (n, k // block_elems, block_bytes), dtype=np.uint8)
        scales = (rng.random((n, k // block_elems, 2)) * 1e-2 + 1e-3).astype(np.float16).view(np.uint8)
        if qtype == T.Q6_K:
            raw[..., 208:210] = scales[..., 0:2]
        else:  # d, dmin
            raw[..., 0:4] = scales
        raw = raw.reshape(n, -1)
    return torch.from_numpy(raw), torch.from_numpy(dequantize(raw, qtype).astype(np.float64))


def _tolerance(x: torch.Tensor, w: torch.Tensor, activations: str) -> torch.Tensor:
    xd = x.double()
    tol = 2.0**-16 * (xd.abs() @ w.abs().T)
    if activations == "q8":
        m, k = x.shape
        amax = xd.abs().reshape(m, k // 32, 32).amax(-1)
        wsum = w.abs().reshape(w.shape[0], k // 32, 32).sum(-1)
        tol = tol + 1.01 * (amax / 254) @ wsum.T
    return tol + 1e-30


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, activations: str, what: str) -> None:
    ref = x.double() @ w.T
    err = (y.double() - ref).abs()
    tol = _tolerance(x, w, activations)
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} is {worst:.2f}x the tolerance"


@pytest.fixture(params=list(gl.ISAS))
def isa(request):
    if gl.gguf_ops() is None:
        pytest.fail("the GGUF kernel failed to build; see the warning in the log")
    if request.param not in gl.available_isas():
        pytest.skip(f"this build or CPU has no {request.param} path (runs: {', '.join(gl.available_isas())})")
    return request.param


@pytest.mark.parametrize("activations", gl.ACTIVATIONS)
@pytest.mark.parametrize("qtype", gl.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_matches_dequantized_matmul(qtype, activations, isa):
    torch.manual_seed(0)
    for m, n, k in _shapes(qtype):
        raw, w = _weight(qtype, n, k)
        x = torch.randn(m, k)
        y = gl.gguf_linear(x, raw, qtype, k, activations=activations, isa=isa)
        assert y.shape == (m, n) and y.dtype == torch.float32
        _check(y, x, w, activations, f"{qtype.name} {isa} {activations} M={m} N={n} K={k}")


@pytest.mark.parametrize("qtype", gl.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_both_products_on_the_same_rows(qtype, isa):
    """The few-row product and the tiled one, each forced, on rows either
    side of the switch; tiles that do not divide the output size."""
    ops = gl.gguf_ops()
    torch.manual_seed(1)
    k = _in_features(qtype)[1]
    raw, w = _weight(qtype, 77, k)
    for m in (1, 5, 40):
        x = torch.randn(m, k)
        for q8 in (False, True):
            acts = "q8" if q8 else "fp32"
            few = ops.gguf_linear(x, raw, int(qtype), k, q8, gl.ISAS[isa], m, 0)
            _check(few, x, w, acts, f"few-row {qtype.name} {isa} {acts} M={m}")
            tiled = ops.gguf_linear(x, raw, int(qtype), k, q8, gl.ISAS[isa], 0, 32)
            _check(tiled, x, w, "fp32", f"tiled {qtype.name} {isa} M={m}")


@pytest.mark.parametrize("qtype", gl.SUPPORTED_TYPES, ids=lambda t: t.name)
def test_dequantize_is_exact(qtype, isa):
    raw, w = _weight(qtype, 17, _in_features(qtype)[2])
    out = gl.gguf_dequantize(raw, qtype, w.shape[1], isa=isa)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), w)


def test_leading_dimensions_and_empty_inputs():
    raw, w = _weight(T.Q4_0, 17, 64)
    x = torch.randn(2, 3, 64)
    y = gl.gguf_linear(x, raw, T.Q4_0, 64)
    assert y.shape == (2, 3, 17)
    _check(y.reshape(6, 17), x.reshape(6, 64), w, "fp32", "3-d x")
    assert gl.gguf_linear(torch.randn(0, 64), raw, T.Q4_0, 64).shape == (0, 17)


def test_torch_fallback_matches(monkeypatch):
    monkeypatch.setattr(gl, "_module", lambda: None)
    raw, w = _weight(T.Q4_1, 17, 576)
    x = torch.randn(3, 576)
    _check(gl.gguf_linear(x, raw, T.Q4_1, 576), x, w, "fp32", "fallback")
    assert torch.equal(gl.gguf_dequantize(raw, T.Q4_1, 576).double(), w)


@pytest.mark.parametrize("change, message", [
    (dict(in_features=48), "not a positive multiple"),
    (dict(in_features=64), "needs 36"),
    (dict(qtype=T.Q5_0), "unsupported GGUF type"),
    (dict(qtype=99), "unsupported GGUF type"),
    (dict(x=torch.randn(2, 32, dtype=torch.float64)), "float32"),
    (dict(x=torch.randn(2, 64)), "last dimension"),
    (dict(qweight=torch.zeros(17, 18, dtype=torch.int8)), "uint8"),
    (dict(activations="int4"), "choose from fp32, q8"),
    (dict(isa="neon"), "unknown or unavailable ISA path 'neon'"),
])
def test_bad_arguments_are_named(change, message):
    raw, _ = _weight(T.Q4_0, 17, 32)
    args = dict(x=torch.randn(2, 32), qweight=raw, qtype=T.Q4_0, in_features=32)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("activations", "isa") if k in args}
    with pytest.raises(ValueError, match=message):
        gl.gguf_linear(args["x"], args["qweight"], args["qtype"], args["in_features"], **kwargs)


@pytest.mark.parametrize("qtype", (T.Q4_0, T.Q4_1, T.Q8_0), ids=lambda t: t.name)
def test_whole_block_products_on_odd_block_counts(qtype, isa):
    """The 32-element formats' own few-row product: odd block counts above
    one (pairs of blocks on AVX-512, then the last block alone, carried on),
    every grouping of weight rows (four, two or one per pass for 1-2, 3-4
    and 5-8 rows of x; output sizes that leave a short last group) and a
    second chunk of x rows (12 = 8 + 4)."""
    torch.manual_seed(2)
    for k in (96, 160):
        for n in (4, 8, 13):
            raw, w = _weight(qtype, n, k)
            for m in (1, 2, 3, 4, 5, 12):
                x = torch.randn(m, k)
                for activations in gl.ACTIVATIONS:
                    y = gl.gguf_linear(x, raw, qtype, k, activations=activations, isa=isa)
                    _check(y, x, w, activations, f"{qtype.name} {isa} {activations} M={m} N={n} K={k}")


def test_q8_0_quants_of_minus_128(isa):
    """-128, which the gguf package's quantizer never writes but a file may
    hold: the integer products take its magnitude through the unsigned
    operand and its sign onto x."""
    raw, _ = _weight(T.Q8_0, 9, 96)
    raw = raw.clone()
    raw.view(9, 3, 34)[:, :, 2:12] = 0x80
    w = torch.from_numpy(dequantize(raw.numpy(), T.Q8_0).astype(np.float64))
    assert (w == 0).sum() < w.numel() and w.min() < 0
    torch.manual_seed(3)
    for m in (1, 3, 12):
        x = torch.randn(m, 96)
        for activations in gl.ACTIVATIONS:
            y = gl.gguf_linear(x, raw, T.Q8_0, 96, activations=activations, isa=isa)
            _check(y, x, w, activations, f"Q8_0 with -128 {isa} {activations} M={m}")
