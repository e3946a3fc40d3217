"""8-bit float KV caches: which format ``--kv-cache-dtype`` means on a
platform, and the scaled conversion every backend must agree with.

A quantized cache holds ``K / k_scale`` and ``V / v_scale`` rounded to the
nearest 8-bit float and saturated to its largest finite value (an
out-of-range key becomes +-max, never inf or NaN); attention reads
``k_scale * K8`` and ``v_scale * V8``. The scales are per layer; without
scales in the checkpoint they are 1.0, as in vLLM.

    name         e4m3 (3 mantissa bits, max 448)     e5m2 (2 mantissa bits, max 57344)
    fp8          the platform's e4m3 flavour         -
    fp8_e4m3     float8_e4m3fn, or e4m3fnuz (MI300)  -
    fp8_e5m2     -                                   float8_e5m2
"""

from __future__ import annotations

import math

import torch

from pllm.core.interfaces import PlatformCapabilities

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2,
              torch.float8_e5m2fnuz)
_CANDIDATES = {
    "fp8": (torch.float8_e4m3fn, torch.float8_e4m3fnuz),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.float8_e4m3fnuz),
    "fp8_e5m2": (torch.float8_e5m2, torch.float8_e5m2fnuz),
}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def scale_kwargs(cache_dtype: torch.dtype, k_scale: float, v_scale: float) -> dict[str, float]:
    """The ``k_scale``/``v_scale`` keywords of ``write_kv`` and ``forward`` for
    a cache in ``cache_dtype``: given only with an 8-bit cache, so a backend
    that stores none need not take them."""
    return {"k_scale": k_scale, "v_scale": v_scale} if is_fp8(cache_dtype) else {}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, caps: PlatformCapabilities,
                           platform_name: str) -> torch.dtype:
    """The cache dtype ``--kv-cache-dtype name`` means on a platform with
    ``caps``: the model dtype for "auto", else the first format of that name
    the platform stores."""
    if name == "auto":
        return model_dtype
    if name not in _CANDIDATES:
        raise ValueError(f"kv_cache_dtype={name!r} is not one of auto, {', '.join(_CANDIDATES)}")
    for dtype in _CANDIDATES[name]:
        if caps.supports_kv_cache_dtype(dtype):
            return dtype
    stored = ", ".join(str(d).removeprefix("torch.") for d in caps.kv_cache_dtypes)
    raise ValueError(
        f"kv_cache_dtype={name!r} is not supported on {platform_name}; its KV cache can be "
        f"stored as: auto (the model dtype){', ' + stored if stored else ''}"
    )


def checkpoint_scale_factor(dtype: torch.dtype) -> float:
    """What a checkpoint's KV scales are multiplied by for a cache in ``dtype``.
    Quantization tools calibrate them for OCP e4m3fn (largest value 448);
    e4m3fnuz (MI300) stops at 240, and the same bits read as half the e4m3fn
    value there, so its scales double (as vLLM does): a calibrated key then
    fits in the range instead of saturating."""
    return 2.0 if dtype == torch.float8_e4m3fnuz else 1.0


def grid(dtype: torch.dtype) -> tuple[float, int, int]:
    """``(largest finite value, exponent of the smallest normal, mantissa
    bits)`` of an 8-bit float: e4m3fn is (448, -6, 3), e5m2 (57344, -14, 2)."""
    info = torch.finfo(dtype)
    mantissa_bits = 3 if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else 2
    return info.max, int(math.log2(info.smallest_normal)), mantissa_bits


def quantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` as ``dtype``: round to nearest even, saturated to the
    largest finite value (torch's own cast turns e5m2 overflow into inf)."""
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-fmax, fmax).to(dtype)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * x`` in ``dtype`` (fp32 unless asked otherwise)."""
    return x.to(torch.float32).mul_(scale).to(dtype) if scale != 1.0 else x.to(dtype)


def round_trip(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache in ``dtype`` gives it back (``quantize`` then
    ``dequantize``), in ``x``'s own dtype: what attention reads."""
    return dequantize(quantize(x, scale, dtype), scale, x.dtype)
