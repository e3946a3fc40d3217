"""The CPU platform's mixture-of-experts kernel (``csrc/moe.cpp``): the
routed experts of a ``pllm.models.moe.MoEBlock`` in one compiled call, fp32
or bf16, given to every block of the model through its ``experts_fn``.

It groups the step's tokens by expert and reads each chosen expert's
weights once for all its tokens, the tiles of all chosen experts shared
out over the cores at once; an expert with more than ``_FEW_ROWS`` tokens
(a prefill) runs its two products as GEMMs instead. The torch version
(``grouped_experts``) runs one expert after another, each product on its
own, and spends most of a decode step in dispatch. Built on its own (not
in ``kernels.py``'s extension), the first time a model with experts is
prepared; where it cannot be built the blocks keep ``grouped_experts``
and the reason is logged once.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from pllm.models.moe import MoEBlock, grouped_experts
from pllm.platforms.cpu.kernels import DISABLE_ENV, build

logger = logging.getLogger(__name__)

# Experts with more tokens than this run as two GEMMs. On a 2-core AVX2
# host (H 256, I 512) the tiles ran 50 GF/s on both cores against MKL's 40
# at 48 rows, and 27 against 29 on one core at 64 rows.
_FEW_ROWS = 64
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def _module():
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("%s=0: the experts run in torch (grouped_experts)", DISABLE_ENV)
        return None
    try:
        return build("pllm_cpu_moe", ("vec.h", "moe.cpp"), ["moe_experts"])
    except Exception as exc:  # no compiler, no ninja, ...: fall back, but say so
        logger.warning("CPU MoE kernel unavailable (%s); the experts run in torch", exc)
        return None


def moe_op():
    """The compiled ``moe_experts(x, w13, w2, weights, ids, few_rows)``, or
    None (with the reason logged once)."""
    module = _module()
    return None if module is None else module.moe_experts


def cpu_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """``grouped_experts``' sum on the compiled kernel: fp32 or bf16 ``x``
    with weights in its dtype (each token's sum kept in fp32, then cast);
    anything else goes to ``grouped_experts``."""
    op = moe_op()
    if op is None or x.dtype not in _DTYPES or not (x.dtype == w13.dtype == w2.dtype) or x.dim() != 2:
        return grouped_experts(x, w13, w2, weights, ids)
    return op(x, w13, w2, weights, ids.long(), _FEW_ROWS)  # a no-op for the router's int64


def use_cpu_moe(model: nn.Module) -> nn.Module:
    """Give every ``MoEBlock`` of ``model`` the compiled experts (building
    the kernel the first time); a model without experts is left alone."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    if blocks and moe_op() is not None:
        for block in blocks:
            block.experts_fn = cpu_experts
    return model
