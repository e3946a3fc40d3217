"""Linear layers on the host routed to the faster of torch's fp32 GEMM paths
for their batch size, for any platform whose tensors live in host memory.

Measured on a 2-core AVX2 host (torch 2.13, MKL), streaming the 30 layers
and LM head of SmolLM2-135M (538 MB, so weights come from DRAM, as in a real
step):

- up to ``SMALL_BATCH`` rows, ``weight @ x.T`` runs at 90-135 GFLOP/s
  against 48-95 for ``F.linear``. Its result is the transposed view of a
  column-major product; the layers after it take it as it is (copying it
  into rows would cost 10-15% of the product);
- beyond that (prefill chunks, large mixed steps) a oneDNN copy of the
  weight packed once at load beats ``F.linear``, which packs on every call:
  64-68 GFLOP/s against 54-60 from 192 to 512 rows, and SmolLM2's prefill
  at 253-262 tokens/s against 221-225 (256-512 tokens). The copies cost as
  much memory as the weights, so they are made only when all of them fit in
  a quarter of the RAM available at load (``PACK_SHARE``); otherwise, and
  for other dtypes, ``F.linear`` serves these batches.

The LM head is the exception: the sampler reads its logits row by row and
they are large, so up to ``SMALL_BATCH`` rows it runs on a oneDNN copy of
the weight packed once (113 MB for SmolLM2): 27 ms for 64 rows against
37 ms for ``weight @ x.T`` plus the copy into rows.

A platform with a faster kernel for some rows (the cpu platform's compiled
few-row product) subclasses :class:`HostLinear` and overrides ``forward``.
"""

from __future__ import annotations

import logging

import psutil
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SMALL_BATCH = 128
PACK_SHARE = 0.25  # of the RAM available at load, at most, for the packed copies


class HostLinear(nn.Module):
    def __init__(self, linear: nn.Linear, *, rows_out: bool = False, pack: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_out = rows_out  # the output must be row-major (the LM head)
        # Packed once, here: the weights are loaded by the time a platform
        # prepares the model. The LM head's copy serves every batch size,
        # the others' only batches over SMALL_BATCH rows.
        self._packed = _onednn_packed(self.weight) if rows_out or pack else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        packed = self._packed is not None and x.dtype == self.weight.dtype == torch.float32
        if packed and rows >= 1 and (self.rows_out or rows > SMALL_BATCH):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        if 1 <= rows <= SMALL_BATCH:
            out = torch.matmul(self.weight, x.t()).t()
            if self.rows_out:
                out = out.contiguous()
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.weight, self.bias)


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (RuntimeError, AttributeError) as exc:  # a torch built without oneDNN
        logger.info("no oneDNN packed weight for the LM head (%s)", exc)
        return None


def should_pack(model: nn.Module, available_bytes: int | None = None) -> bool:
    """Whether packed copies of all of ``model``'s fp32 linear weights (the
    LM head's is always made) fit in ``PACK_SHARE`` of the RAM available;
    the decision is logged either way."""
    size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is nn.Linear and m.weight.dtype == torch.float32)
    if size == 0:
        return False
    if available_bytes is None:
        available_bytes = psutil.virtual_memory().available
    if size <= PACK_SHARE * available_bytes:
        logger.info("packing the linear weights for oneDNN (%.0f MB) for batches over %d rows",
                    size / 1e6, SMALL_BATCH)
        return True
    logger.info("not packing the linear weights for oneDNN: %.0f MB is over %.0f%% of the %.0f MB "
                "available; batches over %d rows use F.linear (about 15%% slower)",
                size / 1e6, 100 * PACK_SHARE, available_bytes / 1e6, SMALL_BATCH)
    return False


def use_host_linears(model: nn.Module, cls: type[HostLinear] = HostLinear, *,
                     pack: bool | None = None) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) with a ``cls`` sharing
    its parameters; the LM head's output stays row-major. ``pack``: give
    each a oneDNN-packed copy for large batches (default: ``should_pack``)."""
    if pack is None:
        pack = should_pack(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                head = f"{name}.{child_name}".lstrip(".") == "lm_head"
                setattr(module, child_name, cls(child, rows_out=head, pack=pack))
    return model
