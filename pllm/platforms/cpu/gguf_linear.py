"""Linear layers over GGUF-quantized weights kept in their block formats
(``csrc/gguf_linear.cpp``): ``y = x @ W.T`` where ``W`` is a GGUF tensor's
raw bytes as uint8 ``[out_features, row_bytes]``, never dequantized whole.

A decode step (up to ``FEW_ROWS`` rows of ``x``) reads every weight block
once for all rows, in fp32 (``activations="fp32"``: exact up to the order of
the fp32 sums) or with the activations quantized to 8 bits per 32 elements
(``"q8"``: integer dot products, as llama.cpp does; error below
``sum |w| * amax(x block) / 254`` per output). More rows (a prefill) multiply
dequantized tiles of ``W`` in fp32, whatever the activation mode.

Part of the platform's compiled kernels (``kernels.py``); where they cannot
be built, :func:`gguf_linear` dequantizes with the ``gguf`` package and
multiplies in torch (``kernels.py`` logs the reason once).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from pllm.platforms.cpu.kernels import cpu_ops

logger = logging.getLogger(__name__)

SUPPORTED_TYPES = (
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
)
ACTIVATIONS = ("fp32", "q8")
ACTIVATIONS_ENV = "PLLM_GGUF_ACTIVATIONS"
# ISA paths by name, as the kernel numbers them; which run here: available_isas().
ISAS = {"scalar": 1, "avx2": 2, "avx512": 3}
# The most rows of x that take the few-row product, per activation mode:
# above it, dequantized tiles and BLAS are faster (measured on 2-core AVX2).
FEW_ROWS = {"fp32": 32, "q8": 24}


def _module():
    return cpu_ops()


def gguf_ops():
    """The compiled module (``gguf_linear``, ``gguf_dequantize``,
    ``gguf_isas``), or None with the reason logged once."""
    return _module()


def available_isas() -> tuple[str, ...]:
    """The ISA paths this build and this CPU can run, slowest first
    (``("scalar", "avx2")`` on an AVX2 host); empty without the kernel."""
    module = _module()
    if module is None:
        return ()
    names = {v: k for k, v in ISAS.items()}
    return tuple(names[i] for i in module.gguf_isas())


def _row_bytes(qtype: GGMLQuantizationType, in_features: int) -> int:
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if in_features <= 0 or in_features % block_elems:
        raise ValueError(f"in_features {in_features} is not a positive multiple of {qtype.name}'s "
                         f"block of {block_elems}")
    return in_features // block_elems * block_bytes


def _check(qweight: torch.Tensor, qtype, in_features: int) -> GGMLQuantizationType:
    try:
        known = GGMLQuantizationType(qtype)
    except ValueError:
        known = None
    if known not in SUPPORTED_TYPES:
        raise ValueError(f"unsupported GGUF type {getattr(known, 'name', qtype)!r}; supported: "
                         f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    qtype = known
    row_bytes = _row_bytes(qtype, in_features)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.device.type != "cpu":
        raise ValueError(f"qweight must be a CPU uint8 [out_features, {row_bytes}] tensor, got "
                         f"{qweight.dtype} {tuple(qweight.shape)} on {qweight.device}")
    if qweight.shape[1] != row_bytes:
        raise ValueError(f"qweight rows are {qweight.shape[1]} bytes; {qtype.name} with in_features "
                         f"{in_features} needs {row_bytes}")
    return qtype


def _isa_id(isa: str | None) -> int:
    if isa is None:
        return 0
    runnable = available_isas()
    if isa not in runnable:
        raise ValueError(f"unknown or unavailable ISA path {isa!r}; this host runs: {', '.join(runnable)}")
    return ISAS[isa]


def gguf_dequantize(qweight: torch.Tensor, qtype, in_features: int, *, isa: str | None = None) -> torch.Tensor:
    """``qweight`` (uint8 ``[N, row_bytes]`` in ``qtype``) as fp32 ``[N, in_features]``."""
    qtype = _check(qweight, qtype, in_features)
    module = _module()
    if module is None:
        return torch.from_numpy(dequantize(qweight.contiguous().numpy(), qtype).astype(np.float32))
    return module.gguf_dequantize(qweight.contiguous(), int(qtype), in_features, _isa_id(isa))


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, qtype, in_features: int, *,
                activations: str = "fp32", isa: str | None = None) -> torch.Tensor:
    """``x @ W.T`` for fp32 ``x`` ``[..., in_features]`` and ``W`` stored as
    ``qweight``: uint8 ``[out_features, row_bytes]`` in the GGUF format
    ``qtype`` (one of ``SUPPORTED_TYPES``), as a GGUF file holds it.
    ``activations``: ``"fp32"`` or ``"q8"`` (few-row product only; see the
    module). ``isa``: force one of :func:`available_isas` (default: the best)."""
    qtype = _check(qweight, qtype, in_features)
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; choose from {', '.join(ACTIVATIONS)}")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU float32 tensor, got {x.dtype} on {x.device}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension is {tuple(x.shape)[-1:]}, in_features is {in_features}")
    isa_id = _isa_id(isa)
    rows = x.reshape(-1, in_features)
    module = _module()
    if module is None:
        weight = torch.from_numpy(dequantize(qweight.contiguous().numpy(), qtype).astype(np.float32))
        out = rows @ weight.T
    else:
        out = module.gguf_linear(rows, qweight.contiguous(), int(qtype), in_features,
                                 activations == "q8", isa_id, FEW_ROWS[activations], 0)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


# ---- the model's quantized layers (pllm.models.quant) on this kernel --------

_QTYPES = {t.name: int(t) for t in SUPPORTED_TYPES}


def qtype_id(fmt: str) -> int:
    """The kernel's id of GGUF format ``fmt`` (ggml's type number)."""
    return _QTYPES[fmt]


def _matmul(module, activations: str):
    q8, few_rows = activations == "q8", FEW_ROWS[activations]

    op = module.gguf_linear

    def matmul(x: torch.Tensor, weight) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32:  # the model's case: flat token rows
            return op(x, weight.data, _QTYPES[weight.format], weight.shape[1], q8, 0, few_rows, 0)
        rows = x.reshape(-1, x.shape[-1]).float()
        out = op(rows, weight.data, _QTYPES[weight.format], weight.shape[1], q8, 0, few_rows, 0)
        return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    return matmul


def _rows(module):
    def rows(table, ids: torch.Tensor) -> torch.Tensor:
        picked = table.data.index_select(0, ids.reshape(-1))
        out = module.gguf_dequantize(picked, _QTYPES[table.format], table.shape[1], 0)
        return out.reshape(*ids.shape, table.shape[1])

    return rows


def activations_from_env() -> str:
    """``PLLM_GGUF_ACTIVATIONS``: how the engine's quantized linears take
    their activations, "fp32" (the default: exact but for the order of the
    sums) or "q8" (8-bit per 32 values and integer dot products, as
    llama.cpp does: faster, and lossy)."""
    value = os.environ.get(ACTIVATIONS_ENV, "fp32")
    if value not in ACTIVATIONS:
        raise ValueError(f"{ACTIVATIONS_ENV}={value!r} is not one of {', '.join(ACTIVATIONS)}")
    return value


def _dense_rows(table: torch.Tensor):
    def rows(_, ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    return rows


def use_gguf_kernels(model: torch.nn.Module, activations: str | None = None) -> torch.nn.Module:
    """Attach the compiled kernel to ``model``'s quantized linears and
    embedding, with ``activations`` (default: :func:`activations_from_env`).
    Without the kernel (no compiler), their weights are dequantized once
    here instead (logged), never per call."""
    from pllm.models.quant import QuantEmbedding, QuantLinear, quant_modules

    layers = list(quant_modules(model))
    if not layers:
        return model
    activations = activations or activations_from_env()
    module = _module()
    for layer in layers:
        formats = layer.formats if isinstance(layer, QuantLinear) else {layer.table.format}
        unknown = formats - set(_QTYPES)
        if unknown:
            raise ValueError(f"the CPU GGUF kernel does not take {', '.join(sorted(unknown))}")
        if module is None:
            if isinstance(layer, QuantLinear):
                layer.segments = [s.dequantize() if not isinstance(s, torch.Tensor) else s
                                  for s in layer.segments]
            else:
                layer.rows = _dense_rows(layer.table.dequantize())
        elif isinstance(layer, QuantLinear):
            layer.matmul = _matmul(module, activations)
        elif isinstance(layer, QuantEmbedding):
            layer.rows = _rows(module)
    if module is None:
        logger.warning("GGUF linear layers and embedding dequantized to float32 at load: the "
                       "CPU kernel is unavailable (see the warning above)")
    return model
