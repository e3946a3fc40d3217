"""The GPU platforms' quantized linear layers: GGUF Q4_0, Q4_1 and Q8_0
(``--quantization gguf``, and ``int8``, whose weights are Q8_0 blocks)
through the Triton dequantizing GEMM, and fp8 (``--quantization fp8``)
through ``torch._scaled_mm`` where cuBLAS has fp8 (NVIDIA sm89+) and the
Triton fp8 GEMM elsewhere (``kernels/quant.py``).

:func:`use_triton_quant` (run by ``prepare_model``) moves every kept weight
of the model to the device and attaches the products:

* a GGUF weight is repacked once into planes (:class:`PlanarGGUF`): the
  quants, the block scales and (Q4_1) the block minima, each a contiguous
  tensor, so that a tile's loads are plain strided ones. The bytes are the
  file's, rearranged (a 4-bit weight stays 4 bits a value). The embedding's
  rows are dequantized from the planes in torch as they are looked up, and
  a tied LM head multiplies the embedding's planes (no second copy).
* an fp8 weight goes to the device as it is; each product quantizes the
  activations on the fly (per token, or per tensor with
  ``PLLM_FP8_ACTIVATIONS=tensor``).

Everything here is device ops only (no read back to the host), so decode
steps can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pllm.models.quant import (
    FP8Weight,
    GGUFWeight,
    QuantEmbedding,
    QuantLinear,
    block_size,
    fp8_activation_scaling,
    quant_modules,
    quantize_fp8_activations,
)

# What the Triton GEMM takes (the K formats' super-blocks are not written).
PLANAR_FORMATS = ("Q8_0", "Q4_0", "Q4_1")
FP8_FORMAT = FP8Weight.format


@dataclass(frozen=True)
class PlanarGGUF:
    """A GGUF weight ``[rows, cols]`` of Q8_0, Q4_0 or Q4_1 in planes:
    ``qs`` int8 ``[rows, cols]`` (Q8_0) or uint8 ``[rows, cols / 2]`` (each
    block's 16 bytes as in the file), ``d`` fp16 ``[rows, cols / 32]``, and
    ``m`` fp16 ``[rows, cols / 32]`` for Q4_1 (else ``None``)."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    format: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.d.shape[1] * 32

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m)
                   if t is not None)

    @classmethod
    def from_gguf(cls, weight: GGUFWeight) -> PlanarGGUF:
        if weight.format not in PLANAR_FORMATS:
            raise ValueError(f"the Triton GEMM takes {', '.join(PLANAR_FORMATS)}, "
                             f"not {weight.format}")
        rows, cols = weight.shape
        values, nbytes = block_size(weight.format)
        blocks = weight.data.reshape(rows, cols // values, nbytes)

        def half(offset: int) -> torch.Tensor:
            return blocks[:, :, offset:offset + 2].contiguous().view(torch.float16).reshape(
                rows, cols // values)

        if weight.format == "Q8_0":
            qs = blocks[:, :, 2:].contiguous().view(torch.int8).reshape(rows, cols)
            return cls(qs, half(0), None, "Q8_0")
        start = 2 if weight.format == "Q4_0" else 4
        qs = blocks[:, :, start:].contiguous().reshape(rows, cols // 2)
        return cls(qs, half(0), half(2) if weight.format == "Q4_1" else None, weight.format)

    def narrow(self, start: int, length: int) -> PlanarGGUF:
        """Rows ``[start, start + length)``, views of these planes."""
        m = None if self.m is None else self.m.narrow(0, start, length)
        return PlanarGGUF(self.qs.narrow(0, start, length), self.d.narrow(0, start, length), m,
                          self.format)

    def to(self, device: torch.device | str) -> PlanarGGUF:
        m = None if self.m is None else self.m.to(device)
        return PlanarGGUF(self.qs.to(device), self.d.to(device), m, self.format)

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """The values ``[rows, cols]`` (or of the rows ``rows`` only), in
        torch on the planes' device."""
        qs, d, m = self.qs, self.d, self.m
        if rows is not None:
            qs, d = qs.index_select(0, rows), d.index_select(0, rows)
            m = None if m is None else m.index_select(0, rows)
        n, blocks = d.shape
        if self.format == "Q8_0":
            q = qs.reshape(n, blocks, 32).float()
        else:
            b = qs.reshape(n, blocks, 16).to(torch.int32)
            q = torch.cat([b & 0xF, b >> 4], dim=-1).float()
            if self.format == "Q4_0":
                q = q - 8
        w = q * d.float()[..., None]
        if m is not None:
            w = w + m.float()[..., None]
        return w.reshape(n, blocks * 32).to(dtype)


def gguf_linear(x: torch.Tensor, weight: PlanarGGUF) -> torch.Tensor:
    """``x @ W.T`` on the Triton dequantizing GEMM, in ``x``'s dtype."""
    from pllm.platforms.triton.kernels.quant import gguf_matmul

    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    y = gguf_matmul(flat, weight.qs, weight.d, weight.m, weight.format, weight.shape[0])
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gguf_rows(table: PlanarGGUF, ids: torch.Tensor) -> torch.Tensor:
    """An embedding lookup: rows ``ids`` of ``table``, fp32 ``[*ids.shape, dim]``."""
    return table.dequantize(rows=ids.reshape(-1)).reshape(*ids.shape, table.shape[1])


@functools.lru_cache(maxsize=None)
def _cublas_fp8(device: torch.device) -> tuple[bool, bool]:
    """(torch._scaled_mm runs fp8 here, with per-row and per-column scales
    too): NVIDIA sm89+ under a CUDA build; row-wise scales need sm90."""
    if device.type != "cuda" or not torch.version.cuda:
        return False, False
    cc = torch.cuda.get_device_capability(device)
    return cc >= (8, 9), cc >= (9, 0)


def scaled_mm(q: torch.Tensor, scale_q: torch.Tensor, weight: FP8Weight, out_dtype: torch.dtype,
              rowwise: bool) -> torch.Tensor:
    """``torch._scaled_mm`` of the quantized activations ``q`` (scales
    ``[M, 1]`` or ``[1, 1]``) and ``weight``: with ``rowwise`` the scales go
    to the GEMM itself (bf16 output); otherwise the GEMM runs unscaled into
    fp32 and both scales are applied to its output."""
    if rowwise:
        return torch._scaled_mm(q, weight.data.t(), scale_a=scale_q.expand(q.shape[0], 1).contiguous(),
                                scale_b=weight.scale.view(1, -1), out_dtype=out_dtype)
    one = torch.ones((), dtype=torch.float32, device=q.device)
    y = torch._scaled_mm(q, weight.data.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * scale_q * weight.scale).to(out_dtype)


def fp8_linear(x: torch.Tensor, weight: FP8Weight, per_token: bool = True) -> torch.Tensor:
    """``x @ W.T`` with ``x`` quantized to e4m3 as it comes (``per_token``,
    else one scale): ``torch._scaled_mm`` where cuBLAS has fp8 and the
    shapes suit it (``K`` and ``N`` multiples of 16), the Triton fp8 GEMM
    otherwise. In ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:  # both GEMMs take rows of K contiguous values
        flat = flat.contiguous()
    q, scale = quantize_fp8_activations(flat, per_token)
    n, k = weight.shape
    cublas, rowwise = _cublas_fp8(x.device)
    if cublas and k % 16 == 0 and n % 16 == 0:
        y = scaled_mm(q, scale, weight, x.dtype, rowwise and x.dtype == torch.bfloat16)
    else:
        from pllm.platforms.triton.kernels.quant import fp8_matmul

        y = fp8_matmul(q, scale, weight.data, weight.scale, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _matmul(per_token: bool):
    def matmul(x: torch.Tensor, weight) -> torch.Tensor:
        if isinstance(weight, PlanarGGUF):
            return gguf_linear(x, weight)
        return fp8_linear(x, weight, per_token)

    return matmul


def use_triton_quant(model: torch.nn.Module) -> torch.nn.Module:
    """Moves ``model``'s kept weights to where its parameters are (and its
    dense segments to their dtype), GGUF ones repacked into planes, and
    attaches the Triton / cuBLAS products; returns the model. A model
    without kept weights is returned as it is."""
    layers = list(quant_modules(model))
    if not layers:
        return model
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    per_token = fp8_activation_scaling() == "token"
    tables: list[tuple[GGUFWeight, PlanarGGUF]] = []
    for layer in layers:  # embeddings first: a tied head takes rows of theirs
        if isinstance(layer, QuantEmbedding):
            planar = PlanarGGUF.from_gguf(layer.table).to(device)
            tables.append((layer.table, planar))
            layer.table, layer.rows = planar, gguf_rows
    matmul = _matmul(per_token)
    for layer in layers:
        if not isinstance(layer, QuantLinear):
            continue
        layer.segments = [_on_device(s, device, dtype, tables) for s in layer.segments]
        layer.matmul = matmul
    return model


def _on_device(segment, device, dtype, tables):
    if isinstance(segment, torch.Tensor):
        return segment.to(device=device, dtype=dtype)
    if isinstance(segment, FP8Weight):
        return segment.to(device)
    for table, planar in tables:  # a view of an embedding's rows: share its planes
        if (segment.data.untyped_storage().data_ptr() == table.data.untyped_storage().data_ptr()
                and segment.format == table.format and segment.shape[1] == table.shape[1]):
            offset = segment.data.data_ptr() - table.data.data_ptr()
            row_bytes = table.data.stride(0)
            if offset % row_bytes == 0 and 0 <= offset // row_bytes < table.shape[0]:
                return planar.narrow(offset // row_bytes, segment.shape[0])
    return PlanarGGUF.from_gguf(segment).to(device)
