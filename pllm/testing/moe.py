"""The reference mixture of experts: every token through each of its
experts one at a time, in plain torch. What a platform's grouped MoE
kernel (``pllm.models.moe.MoEBlock.experts_fn``) is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] * w2[e] @ (silu(g) * u)`` with
    ``e = ids[t, k]`` and ``[g; u] = w13[e] @ x[t]``, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    half = w13.shape[1] // 2
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].double() @ x[t].double()
            y = w2[e].double() @ (F.silu(h[:half]) * h[half:])
            out[t] += float(weights[t, k]) * y
    return out.to(x.dtype)
