"""The rotary tables against transformers' own rope functions: LongRoPE's
short frequencies within the original context and its long ones from there
on, with its attention factor; partial rotary leaves the last channels as
they are."""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pllm.models.layers import RotaryEmbedding

ORIGINAL = 32


def _phi3_config(partial: float = 0.75):
    return AutoConfig.for_model(
        "phi3", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, vocab_size=320,
        max_position_embeddings=128, original_max_position_embeddings=ORIGINAL,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": partial,
                         "short_factor": [1.0, 1.3, 1.9, 2.4, 3.1, 4.0][:int(8 * partial)],
                         "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0][:int(8 * partial)]})


def test_longrope_short_within_the_original_context_long_beyond():
    cfg = _phi3_config()
    rotary = RotaryEmbedding(cfg, head_dim=16, max_positions=64)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, torch.device("cpu"))
    long, long_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, torch.device("cpu"),
                                                         seq_len=ORIGINAL + 1)
    assert factor == long_factor and factor > 1.0
    assert not torch.allclose(short, long)
    pos = torch.arange(64, dtype=torch.float)
    want = torch.cat([torch.outer(pos[:ORIGINAL], short), torch.outer(pos[ORIGINAL:], long)])
    assert rotary.rotary_dim == 12 and rotary.cos.shape == (64, 6)
    torch.testing.assert_close(rotary.cos, want.cos() * factor)
    torch.testing.assert_close(rotary.sin, want.sin() * factor)


def test_partial_rotary_leaves_the_last_channels():
    rotary = RotaryEmbedding(_phi3_config(), head_dim=16, max_positions=64)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    positions = torch.tensor([0, 3, 31, 32, 63])
    q2, k2 = rotary(positions, q.clone(), k.clone())
    assert torch.equal(q2[..., 12:], q[..., 12:]) and torch.equal(k2[..., 12:], k[..., 12:])
    assert not torch.allclose(q2[1:, :, :12], q[1:, :, :12])
    # A rotation, scaled by LongRoPE's attention factor.
    factor = ROPE_INIT_FUNCTIONS["longrope"](_phi3_config(), torch.device("cpu"))[1]
    torch.testing.assert_close(q2[..., :12].norm(dim=-1), q[..., :12].norm(dim=-1) * factor)


def test_gemma3_from_a_transformers_4_config():
    """transformers 4 writes Gemma 3's layer kinds as a period and its local
    rope base apart: local layers get plain RoPE on that base."""
    from types import SimpleNamespace

    from pllm.models.gemma import _layer_types

    cfg = SimpleNamespace(model_type="gemma3_text", num_hidden_layers=6,
                          sliding_window_pattern=3, rope_theta=1e6,
                          rope_local_base_freq=10000.0, rope_scaling=None)
    assert _layer_types(cfg) == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    gemma2 = SimpleNamespace(model_type="gemma2", num_hidden_layers=4)  # even layers local
    assert _layer_types(gemma2) == ["sliding_attention", "full_attention"] * 2
    local = RotaryEmbedding(cfg, head_dim=16, max_positions=8, layer_type="sliding_attention")
    glob = RotaryEmbedding(cfg, head_dim=16, max_positions=8, layer_type="full_attention")
    for rotary, base in ((local, 10000.0), (glob, 1e6)):
        inv = 1.0 / base ** (torch.arange(0, 16, 2, dtype=torch.float) / 16)
        torch.testing.assert_close(rotary.cos, torch.outer(torch.arange(8.0), inv).cos())
