"""Linear layers on the CPU platform: the host routing of
``pllm.platforms.common.host_linear`` (``weight @ x.T`` up to 128 rows, a
oneDNN-packed LM head, ``F.linear`` beyond), and below it, up to
``_FEW_ROWS`` rows, the compiled ``linear_small`` kernel
(``csrc/linear.cpp``), which reads each weight once for all rows: 22-27 GB/s
for 1-4 rows on a 2-core AVX2 host, against 11-19 GB/s for the best torch
path (MKL's single-row GEMV runs on one thread, and its GEMM packs the
weight on every call).
"""

from __future__ import annotations

import torch
from torch import nn

from pllm.platforms.common.host_linear import SMALL_BATCH as _SMALL_BATCH
from pllm.platforms.common.host_linear import HostLinear, use_host_linears
from pllm.platforms.cpu.kernels import cpu_ops

_FEW_ROWS = 24

__all__ = ["CPULinear", "_FEW_ROWS", "_SMALL_BATCH", "use_cpu_linears"]


class CPULinear(HostLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        if 1 <= rows <= _FEW_ROWS and x.dtype == self.weight.dtype == torch.float32:
            ops = cpu_ops()
            if ops is not None:
                return ops.linear_small(x, self.weight, self.bias)
        return super().forward(x)


def use_cpu_linears(model: nn.Module) -> nn.Module:
    return use_host_linears(model, CPULinear)
