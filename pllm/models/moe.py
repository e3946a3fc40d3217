"""Mixture of experts: Mixtral, Qwen2-MoE (with its shared expert) and
Qwen3-MoE blocks, in place of the dense MLP of some or all layers.

The router is whole on every rank; each expert's intermediate dimension is
split over the tensor-parallel ranks like a dense MLP's, so a rank holds a
slice of every expert and one all-reduce ends the block. The experts run
grouped: the step's tokens are sorted by the expert they were routed to, and
each expert that received any multiplies its tokens at once (its weights
read once per step; an expert that received none costs nothing). A
platform may replace :func:`grouped_experts` with its own kernel through
:attr:`MoEBlock.experts_fn`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pllm.models.parallel import SINGLE, TensorParallel, divide


class MoESpec:
    """What a config says about its experts (this rank's share of each)."""

    def __init__(self, cfg, tp_size: int) -> None:
        self.model_type = cfg.model_type
        self.num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        # Mixtral always renormalises the top-k weights; Qwen says so in its config.
        self.renormalize = cfg.model_type == "mixtral" or bool(getattr(cfg, "norm_topk_prob",
                                                                       False))
        total = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        self.total_intermediate = total
        self.intermediate = divide(total, tp_size, "the experts' intermediate size")
        shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
        self.total_shared = shared
        self.shared = divide(shared, tp_size, "shared_expert_intermediate_size") if shared else 0
        self.mlp_only_layers = set(getattr(cfg, "mlp_only_layers", None) or ())
        self.sparse_step = getattr(cfg, "decoder_sparse_step", 1) or 1

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has experts (Qwen-MoE may keep some dense)."""
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.sparse_step == 0)


def route(router_logits: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``top_k`` experts and their weights: softmax over all
    experts in fp32, the top ``top_k``, renormalised to sum to one if asked
    (as transformers' routers do)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[t, k] * expert[ids[t, k]](x[t])`` for every token
    ``t``, with ``expert[e](h) = w2[e] @ (silu(gate) * up)`` and
    ``[gate; up] = w13[e] @ h``. Tokens are grouped by expert: one product
    per expert that received tokens."""
    num_tokens, top_k = ids.shape
    out = torch.zeros_like(x)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token_of = order // top_k
    scale = weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start:start + count]
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        # Weighted in the weights' dtype (fp32 for Mixtral, as transformers), then cast.
        out.index_add_(0, rows, (y * scale[start:start + count, None]).to(out.dtype))
        start += count
    return out


class MoEBlock(nn.Module):
    """One layer's experts (and Qwen2-MoE's shared expert), this rank's
    slice of each; returns the block's output, all-reduced."""

    # (x, w13, w2, weights, ids) -> the experts' weighted sum: a platform's
    # grouped kernel may take the place of the default.
    experts_fn: Callable[..., torch.Tensor] = staticmethod(grouped_experts)

    def __init__(self, hidden: int, spec: MoESpec, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.spec, self.tp = spec, tp
        self.gate = nn.Linear(hidden, spec.num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(spec.num_experts, 2 * spec.intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(spec.num_experts, hidden, spec.intermediate))
        if spec.shared:
            self.shared_expert = SharedExpert(hidden, spec.shared)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.spec.top_k, self.spec.renormalize)
        if self.spec.model_type != "mixtral":  # Qwen's routers cast them to the model dtype
            weights = weights.to(x.dtype)
        out = self.experts_fn(x, self.w13, self.w2, weights, ids)
        if self.spec.shared:
            # The sigmoid scales this rank's partial sum: the same after the all-reduce.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)


class SharedExpert(nn.Module):
    """Qwen2-MoE's expert every token goes through (this rank's columns;
    the block all-reduces it with the routed experts)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
