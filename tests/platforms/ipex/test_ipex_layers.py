"""IPEX's fused layers against the model's own torch layers, on random
inputs (row-major and the strided views the model hands them), fp32 and
bf16; which layers a CPU gets, and ``PLLM_IPEX_LAYERS``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pllm.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from pllm.platforms.ipex import layers
from pllm.platforms.ipex.layers import (
    ALL_LAYERS,
    IPEXRMSNorm,
    IPEXRotaryEmbedding,
    IPEXSiluAndMul,
    chosen_layers,
    use_ipex_layers,
)

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _swapped(module: nn.Module, cls: type) -> nn.Module:
    import copy

    other = copy.deepcopy(module)
    other.__class__ = cls
    return other


@DTYPES
def test_rms_norm_with_and_without_the_residual(dtype):
    norm = RMSNorm(96, 1e-5).to(dtype)
    norm.weight.data = _randn(96, dtype=dtype, seed=1)
    fast = _swapped(norm, IPEXRMSNorm)
    x, residual = _randn(7, 96, dtype=dtype), _randn(7, 96, dtype=dtype, seed=2)
    torch.testing.assert_close(fast(x), norm(x), **TOL[dtype])
    want, want_res = norm(x, residual)
    got, got_res = fast(x, residual.clone())
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_res, want_res, **TOL[dtype])
    heads = _randn(5, 3, 96, dtype=dtype, seed=3)  # q/k norms: [tokens, heads, head_dim]
    torch.testing.assert_close(fast(heads), norm(heads), **TOL[dtype])


@DTYPES
def test_silu_and_mul(dtype):
    x = _randn(6, 2 * 80, dtype=dtype)
    torch.testing.assert_close(IPEXSiluAndMul()(x), SiluAndMul()(x), **TOL[dtype])


@DTYPES
def test_rotary_on_views_of_the_qkv_product(dtype):
    class Cfg:
        rope_theta = 10000.0

    rope = RotaryEmbedding(Cfg(), 64, 512)
    fast = _swapped(rope, IPEXRotaryEmbedding)
    qkv = _randn(9, (4 + 2 * 2) * 64, dtype=dtype)
    q, k, _ = qkv.split([256, 128, 128], dim=-1)
    q, k = q.reshape(9, 4, 64), k.reshape(9, 2, 64)  # strided views, as the model has them
    positions = torch.tensor([0, 1, 2, 100, 101, 7, 300, 511, 3])
    want_q, want_k = rope(positions, q, k)
    got_q, got_k = fast(positions, q.clone(), k.clone())
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])


def test_prepacked_linears_compute_the_same_product():
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False))
    x = _randn(5, 64, dtype=torch.float32)
    with torch.no_grad():
        want = model(x)
        use_ipex_layers(model, ("linear",))
        assert not any(type(m) is nn.Linear for m in model.modules()), model
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        for rows in (1, 3, 40):
            inputs = _randn(rows, 64, dtype=torch.float32, seed=rows)
            assert model(inputs).shape == (rows, 32)


def test_the_choice_follows_the_instruction_set_unless_told(monkeypatch):
    monkeypatch.delenv(layers.LAYERS_ENV, raising=False)
    assert chosen_layers("AVX2") == ("rotary",)
    assert chosen_layers("AMX") == ALL_LAYERS
    monkeypatch.setenv(layers.LAYERS_ENV, "none")
    assert chosen_layers("AMX") == ()
    monkeypatch.setenv(layers.LAYERS_ENV, "all")
    assert chosen_layers("AVX2") == ALL_LAYERS
    monkeypatch.setenv(layers.LAYERS_ENV, "rms_norm, linear")
    assert chosen_layers("AVX2") == ("rms_norm", "linear")
    monkeypatch.setenv(layers.LAYERS_ENV, "rms_norm,flash")
    with pytest.raises(ValueError, match="unknown layer.*flash"):
        chosen_layers("AVX2")
