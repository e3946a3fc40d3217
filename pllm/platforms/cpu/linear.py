"""Linear layers routed to the fastest fp32 GEMM path for their batch size.

Measured on a 2-core AVX2 host (torch 2.13, MKL), streaming 30 layers of
SmolLM2-135M weights: ``F.linear`` packs the weight on every call and runs
single-row products at about 11 GB/s (MKL's GEMV is single threaded) and
small batches (2-64 rows) at 5-65 GFLOP/s. For one row, the compiled
``gemv`` kernel (``csrc/gemv.cpp``, both cores) reads the weight at about
17 GB/s and gave the steadiest batch-1 step (36-39 ms against 40-56 ms for
the alternative, a batched product over 8 slices of the weight's rows, which
remains the fallback); for up to 128 rows, ``weight @ x.T`` is 1.3-2x faster than
``F.linear``; beyond that F.linear wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pllm.platforms.cpu.kernels import gemv_op

# Above this many rows F.linear's packed GEMM is fastest.
_SMALL_BATCH = 128


class CPULinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.num_slices = next((k for k in (8, 2) if self.out_features % k == 0), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        if rows == 1 and x.dtype == torch.float32 and (gemv := gemv_op()) is not None:
            out = gemv(self.weight, x[0]).unsqueeze(0)
        elif rows == 1 and self.num_slices > 1:
            k = self.num_slices
            w = self.weight.view(k, self.out_features // k, self.in_features)
            out = torch.bmm(w, x.t().expand(k, -1, -1)).view(1, self.out_features)
        elif 1 <= rows <= _SMALL_BATCH:
            out = torch.matmul(self.weight, x.t()).t()  # a transposed view: consumers take strides
        else:
            return F.linear(x, self.weight, self.bias)
        return out + self.bias if self.bias is not None else out


def use_cpu_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in ``model`` (in place) with a CPULinear
    sharing its parameters."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, CPULinear(child))
    return model
