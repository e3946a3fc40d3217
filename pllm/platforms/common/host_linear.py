"""Linear layers on the host routed to the faster of torch's fp32 GEMM paths
for their batch size, for any platform whose tensors live in host memory.

Measured on a 2-core AVX2 host (torch 2.13, MKL), streaming the 30 layers
and LM head of SmolLM2-135M (538 MB, so weights come from DRAM, as in a real
step):

- up to ``SMALL_BATCH`` rows, ``weight @ x.T`` runs at 90-135 GFLOP/s
  against 48-95 for ``F.linear``. Its result is the transposed view of a
  column-major product; the layers after it take it as it is (copying it
  into rows would cost 10-15% of the product);
- beyond that ``F.linear``'s packed GEMM wins.

The LM head is the exception: the sampler reads its logits row by row and
they are large, so up to ``SMALL_BATCH`` rows it runs on a oneDNN copy of
the weight packed once (113 MB for SmolLM2): 27 ms for 64 rows against
37 ms for ``weight @ x.T`` plus the copy into rows.

A platform with a faster kernel for some rows (the cpu platform's compiled
few-row product) subclasses :class:`HostLinear` and overrides ``forward``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SMALL_BATCH = 128


class HostLinear(nn.Module):
    def __init__(self, linear: nn.Linear, *, rows_out: bool = False) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_out = rows_out  # the output must be row-major (the LM head)
        # Packed once, here: the weights are loaded by the time a platform prepares the model.
        self._packed = _onednn_packed(self.weight) if rows_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        if 1 <= rows <= SMALL_BATCH:
            if self._packed is not None and x.dtype == self.weight.dtype == torch.float32:
                return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
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


def use_host_linears(model: nn.Module, cls: type[HostLinear] = HostLinear) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) with a ``cls`` sharing
    its parameters; the LM head's output stays row-major."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                head = f"{name}.{child_name}".lstrip(".") == "lm_head"
                setattr(module, child_name, cls(child, rows_out=head))
    return model
