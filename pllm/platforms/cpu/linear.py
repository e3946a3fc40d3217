"""Linear layers on the CPU platform: the host routing of
``pllm.platforms.common.host_linear`` (weights packed for MKL or oneDNN,
whichever is faster on the host, where torch has MKL; a oneDNN-packed LM
head), and below it, up to :func:`few_rows` rows,
the compiled ``linear_small`` kernel (``csrc/linear.cpp``), which reads each
weight once for all rows: 22-27 GB/s for 1-4 rows on a 2-core AVX2 host,
against 11-19 GB/s for unpacked torch products (MKL's single-row GEMV runs
on one thread, and its GEMM packs the weight on every call).

Against MKL's packed product the kernel keeps fewer rows, and how many
depends on the vectors MKL runs with (the kernel's are 256-bit). Streaming
SmolLM2-135M's 30 layers on a 2-core AVX-512 host: at 8 rows 27.1 ms
against MKL's 26.8, at 12 rows 31.7 against 25.0; with MKL held to AVX2,
at 12 rows 28.7 against 30.3, at 16 rows 36.2 against 35.1. On a 2-core
AVX-512 AMD EPYC, where oneDNN's packed product is the faster: 8.1 ms
against oneDNN's 10.1 at one row, 12.9 against 12.7 at 8, 18.4 against
14.0 at 12. Unpacked, it stays ahead up to 24 rows.
"""

from __future__ import annotations

import torch
from torch import nn

from pllm.platforms.common.host_linear import SMALL_BATCH as _SMALL_BATCH
from pllm.platforms.common.host_linear import HostLinear, use_host_linears
from pllm.platforms.cpu.gguf_linear import available_isas
from pllm.platforms.cpu.kernels import cpu_ops

_FEW_ROWS = 24  # against unpacked products

__all__ = ["CPULinear", "_FEW_ROWS", "_SMALL_BATCH", "few_rows", "use_cpu_linears"]


def few_rows(packed: bool) -> int:
    """Up to how many rows ``linear_small`` beats the product a layer would
    otherwise run: a packed copy's at every batch size (``packed``), or an
    unpacked one (see the module's docstring)."""
    if not packed:
        return _FEW_ROWS
    return 8 if "avx512" in available_isas() else 12  # the kernels' build, not just the CPU


class CPULinear(HostLinear):
    def __init__(self, linear: nn.Linear, **kwargs) -> None:
        super().__init__(linear, **kwargs)
        self.few_rows = few_rows(self.every_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] if x.dim() == 2 else -1
        if 1 <= rows <= self.few_rows and x.dtype == self.weight.dtype == torch.float32:
            ops = cpu_ops()
            if ops is not None:
                return ops.linear_small(x, self.weight, self.bias)
        return super().forward(x)


def use_cpu_linears(model: nn.Module) -> nn.Module:
    return use_host_linears(model, CPULinear)
