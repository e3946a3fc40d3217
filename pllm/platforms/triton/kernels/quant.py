"""Products with quantized weights: ``y = x @ W.T`` with ``W`` kept in a
GGUF block format (Q4_0, Q4_1, Q8_0; ``--quantization int8`` is Q8_0) or in
fp8 e4m3 with per-channel scales. Each program owns one (M, N) tile of
``y`` and walks K, dequantizing its weight tile in registers; nothing of
``W`` is ever written out in a wider type.

GGUF weights arrive repacked into planes (``pllm.platforms.triton.quant``):
``qs`` the quants (int8 ``[N, K]`` for Q8_0; uint8 ``[N, K/2]`` for the
4-bit formats, each block's 16 bytes as GGUF has them: byte ``j`` holds
value ``j`` in its low nibble and value ``j + 16`` in its high one), ``d``
fp16 ``[N, K/32]`` the block scales, and for Q4_1 ``m`` fp16 ``[N, K/32]``
the block minima. A value is ``d * q`` (Q8_0), ``d * (q - 8)`` (Q4_0) or
``d * q + m`` (Q4_1), computed in fp32 and then rounded to the activation
dtype, so the products are those of the dequantized weight in that dtype.

fp8 takes both operands as e4m3 bits in uint8 and decodes them in integer
arithmetic (``_e4m3_to_f32``), which Triton runs on any GPU (its own fp8
type needs sm89+) and under the interpreter. Every e4m3 value is exact in
fp16, so the tiles go to ``tl.dot`` in fp16 (fp32 under the interpreter,
whose fp16 dot is not exact), with fp32 accumulation; the scales of the
activations (per row, or one) and of the weight (per column of ``y``) are
applied once, to the accumulator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block formats by the ``FMT`` constexpr.
Q8_0, Q4_0, Q4_1 = 0, 1, 2
FORMAT_IDS = {"Q8_0": Q8_0, "Q4_0": Q4_0, "Q4_1": Q4_1}


@triton.jit
def _gguf_matmul_kernel(x_ptr, q_ptr, d_ptr, m_ptr, y_ptr, M, N, K,
                        stride_xm, stride_qn, stride_dn, stride_ym,
                        FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & col_ok[None, :]
        if FMT == 0:
            q = tl.load(q_ptr + cols64[None, :] * stride_qn + ks[:, None], mask=w_ok, other=0)
            q = q.to(tl.float32)
        else:
            byte = (ks // 32) * 16 + ks % 16
            shift = (ks // 16) % 2 * 4
            raw = tl.load(q_ptr + cols64[None, :] * stride_qn + byte[:, None], mask=w_ok, other=0)
            q = ((raw.to(tl.int32) >> shift[:, None]) & 0xF).to(tl.float32)
            if FMT == 1:
                q = q - 8.0
        scale_at = d_ptr + cols64[None, :] * stride_dn + (ks // 32)[:, None]
        w = q * tl.load(scale_at, mask=w_ok, other=0.0).to(tl.float32)
        if FMT == 2:
            w += tl.load(m_ptr + cols64[None, :] * stride_dn + (ks // 32)[:, None], mask=w_ok,
                         other=0.0).to(tl.float32)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")
    dst = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _e4m3_to_f32(bits):
    """e4m3fn bits (uint8) as fp32 values: sign, 4 exponent bits (bias 7), 3
    mantissa bits; exponent 0 is subnormal (m * 2^-9). NaN (0x7f, 0xff) is
    not decoded: weights and quantized activations never hold it."""
    b = bits.to(tl.int32)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = ((b & 0x80) << 24) | ((exp + 120) << 23) | (man << 20)
    value = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    return tl.where((exp == 0) & ((b & 0x80) != 0), -value, value)


@triton.jit
def _fp8_matmul_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, y_ptr, M, N, K,
                       stride_am, stride_wn, stride_ym,
                       PER_TOKEN: tl.constexpr, DOT_FP32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = _e4m3_to_f32(tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :],
                                 mask=row_ok[:, None] & k_ok[None, :], other=0))
        w = _e4m3_to_f32(tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None],
                                 mask=k_ok[:, None] & col_ok[None, :], other=0))
        if DOT_FP32:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(tl.float16), w.to(tl.float16), acc)
    if PER_TOKEN:
        sa = tl.load(sa_ptr + rows, mask=row_ok, other=0.0)
    else:
        sa = tl.load(sa_ptr + rows * 0)
    sw = tl.load(sw_ptr + cols, mask=col_ok, other=0.0)
    y = acc * sa[:, None] * sw[None, :]
    dst = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _tiles(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by shape only: decode's few
    rows take the smallest M tile and wide N tiles; prefill larger M."""
    if m <= 16:
        return 16, 64, 64, 4
    if m <= 64:
        return 32, 64, 64, 4
    return 64, 64, 64, 4


def gguf_matmul(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                fmt: str, out_features: int) -> torch.Tensor:
    """``x`` ``[M, K]`` (fp32, fp16 or bf16, rows contiguous) times the planes
    of a weight ``[out_features, K]`` in ``fmt``; ``[M, out_features]`` in
    ``x``'s dtype."""
    rows, k = x.shape
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    bm, bn, bk, warps = _tiles(rows, out_features)
    grid = (triton.cdiv(rows, bm), triton.cdiv(out_features, bn))
    _gguf_matmul_kernel[grid](x, qs, d, d if m is None else m, y, rows, out_features, k,
                              x.stride(0), qs.stride(0), d.stride(0), y.stride(0),
                              FMT=FORMAT_IDS[fmt], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                              num_warps=warps)
    return y


def fp8_matmul(a: torch.Tensor, scale_a: torch.Tensor, w: torch.Tensor, scale_w: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``(a * scale_a) @ (w * scale_w[:, None]).T``: ``a`` e4m3 ``[M, K]``
    with float32 ``scale_a`` ``[M, 1]`` (per token) or ``[1, 1]``, ``w``
    e4m3 ``[N, K]`` with float32 ``scale_w`` ``[N]``."""
    rows, k = a.shape
    n = w.shape[0]
    y = torch.empty(rows, n, dtype=out_dtype, device=a.device)
    if rows == 0:
        return y
    bm, bn, bk, warps = _tiles(rows, n)
    grid = (triton.cdiv(rows, bm), triton.cdiv(n, bn))
    _fp8_matmul_kernel[grid](a.view(torch.uint8), scale_a, w.view(torch.uint8), scale_w, y,
                             rows, n, k, a.stride(0), w.stride(0), y.stride(0),
                             PER_TOKEN=scale_a.numel() != 1,
                             DOT_FP32=a.device.type == "cpu",
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y
