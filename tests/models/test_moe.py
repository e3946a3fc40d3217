"""The grouped experts (``pllm.models.moe.grouped_experts``) against the
reference (``pllm.testing.moe``) on random routings, among them experts
that receive no token and tokens routed to one expert twice over k; the
router against transformers' rule (softmax, top-k, renormalised or not)."""

from __future__ import annotations

import pytest
import torch

from pllm.models.moe import grouped_experts, route
from pllm.testing.moe import reference_experts


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 2), (7, 8, 2), (33, 6, 3),
                                                          (16, 4, 1)])
def test_grouped_experts_match_the_reference(num_tokens, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts)
    hidden, inter = 24, 20
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    # Only the first half of the experts get tokens: the rest receive none.
    used = max(top_k, num_experts // 2)
    ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen)
    got = grouped_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, reference_experts(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)
    assert ids.unique().numel() < num_experts  # some experts received no token


def test_an_expert_chosen_twice_counts_twice():
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(2, 10, 8), torch.randn(2, 8, 5)
    ids = torch.tensor([[0, 0], [1, 0], [1, 1]])
    weights = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.3, 0.3]])
    torch.testing.assert_close(grouped_experts(x, w13, w2, weights, ids),
                               reference_experts(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_is_softmax_then_top_k(renormalize):
    logits = torch.randn(9, 6)
    weights, ids = route(logits, 2, renormalize)
    probs = torch.softmax(logits.double(), dim=-1)
    for t in range(9):
        top = sorted(range(6), key=lambda e: -probs[t, e])[:2]
        assert ids[t].tolist() == top
        want = probs[t, top]
        want = want / want.sum() if renormalize else want
        torch.testing.assert_close(weights[t].double(), want, rtol=1e-6, atol=1e-6)
