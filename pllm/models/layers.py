"""Building blocks shared by the decoder models, and the hooks through which
a platform may change how a model runs (``Platform.prepare_model``):

* the blocks here (``RMSNorm``, ``SiluAndMul``, ``RotaryEmbedding``) and the
  models' ``nn.Linear`` layers may be given a subclass with the same
  parameters (``module.__class__ = Faster``), or be replaced by a module
  with the same call signature;
* a plain dense decoder layer describes itself as :class:`DenseDecoderWeights`
  and takes a :class:`FusedDecoderLayer` in its ``fused`` attribute, which
  runs before its modules and may decline a step (return None).

Nothing else of a model's classes is part of what platforms may rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pllm.core.interfaces import ForwardContext
from pllm.core.kv_cache.fp8 import scale_kwargs

if TYPE_CHECKING:
    from pllm.models.quant import GGUFWeight

__all__ = ["DenseDecoderWeights", "ForwardContext", "FusedDecoderLayer", "PagedAttention",
           "RMSNorm", "RotaryEmbedding", "SiluAndMul"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``,
        the residual stream of a decoder layer (a platform may fuse the two)."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SiluAndMul(nn.Module):
    """``[gate | up]`` -> ``silu(gate) * up``: the gated MLP's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class RotaryEmbedding(nn.Module):
    """RoPE with the inverse frequencies from transformers' own rope functions
    (default, linear, llama3, yarn, longrope, ...), so scaling matches the
    reference. ``partial_rotary_factor`` (Phi-4-mini, ...) rotates only the
    first ``rotary_dim`` channels of each head.

    LongRoPE (Phi-3) has two sets of frequencies: transformers uses the
    short ones for a sequence within ``original_max_position_embeddings``
    and recomputes the whole sequence with the long ones beyond it. A paged
    cache keeps the K it computed, so here a position takes the short
    frequencies below that length and the long ones from it on: the same as
    transformers for every sequence within the original context."""

    def __init__(self, hf_config, head_dim: int, max_positions: int,
                 layer_type: str | None = None) -> None:
        super().__init__()
        self.hf_config, self.head_dim, self.max_positions = hf_config, head_dim, max_positions
        # Gemma 3: each kind of layer ("sliding_attention", "full_attention")
        # has its own rope parameters.
        self.layer_type = layer_type
        factor = self._params().get("partial_rotary_factor",
                                    getattr(hf_config, "partial_rotary_factor", None) or 1.0)
        self.rotary_dim = int(head_dim * factor)
        half = self.rotary_dim // 2
        self.register_buffer("cos", torch.empty(max_positions, half), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, half), persistent=False)
        self.reset_tables()

    def _params(self) -> dict:
        cfg = self.hf_config
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if self.layer_type is None:
            return params
        if self.layer_type in params:  # transformers 5: parameters per kind of layer
            return params[self.layer_type]
        # transformers 4 (Gemma 3): local layers take plain RoPE on their own
        # base, global ones the model's rope_theta and rope_scaling.
        if self.layer_type == "sliding_attention":
            return {"rope_type": "default", "rope_theta": getattr(cfg, "rope_local_base_freq")}
        return params

    def _per_layer_type(self) -> bool:
        params = getattr(self.hf_config, "rope_parameters", None) or {}
        return self.layer_type is not None and self.layer_type in params

    def reset_tables(self) -> None:
        """(Re)compute the cos/sin tables on the CPU, then move them to the
        buffers' device (models are built on the meta device first)."""
        if self.cos.device.type == "meta":
            return  # filled in after the model leaves the meta device
        cfg, dim, params = self.hf_config, self.rotary_dim, self._params()
        rope_type = params.get("rope_type", params.get("type", "default"))
        cpu = torch.device("cpu")
        pos = torch.arange(self.max_positions, dtype=torch.float, device=cpu)
        if rope_type == "default":
            base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=cpu) / dim))
            freqs, scaling = torch.outer(pos, inv_freq), 1.0
        else:
            by_layer = {"layer_type": self.layer_type} if self._per_layer_type() else {}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, cpu, **by_layer)
            freqs = torch.outer(pos, inv_freq.float().to(cpu))
            if rope_type == "longrope":
                original = int(params.get("original_max_position_embeddings")
                               or getattr(cfg, "original_max_position_embeddings", 0) or 0)
                if 0 < original < self.max_positions:
                    long_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, cpu, seq_len=original + 1)
                    freqs[original:] = torch.outer(pos[original:], long_freq.float().to(cpu))
        device = self.cos.device
        self.cos = (freqs.cos() * scaling).to(device)
        self.sin = (freqs.sin() * scaling).to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q, k: [tokens, heads, head_dim] (HF's rotate-half layout, over the
        first ``rotary_dim`` channels)."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        if self.rotary_dim == self.head_dim:
            return _rotate(q, cos, sin), _rotate(k, cos, sin)
        d = self.rotary_dim
        return (torch.cat((_rotate(q[..., :d], cos, sin), q[..., d:]), dim=-1),
                torch.cat((_rotate(k[..., :d], cos, sin), k[..., d:]), dim=-1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's cache, then attends through the
    platform's backend. ``k_scale``/``v_scale`` are what an 8-bit cache
    stores K and V divided by (1.0 unless the checkpoint gives them)."""

    def __init__(self, layer_idx: int, scale: float, sliding_window: int | None,
                 soft_cap: float | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.scale = scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.scales_from_checkpoint = False

    def forward(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        cache = ctx.kv_caches[self.layer_idx]
        scales = scale_kwargs(cache.dtype, self.k_scale, self.v_scale)
        ctx.backend.write_kv(k, v, cache, ctx.metadata.slot_mapping, **scales)
        # Passed only when set: a backend without the capability need not take it.
        cap = {} if self.soft_cap is None else {"soft_cap": self.soft_cap}
        return ctx.backend.forward(q, cache, ctx.metadata, scale=self.scale,
                                   sliding_window=self.sliding_window, **scales, **cap)


@dataclass(frozen=True)
class DenseDecoderWeights:
    """A pre-norm decoder layer with fused QKV and gate/up projections, RoPE,
    RMSNorms and a SiLU-gated MLP, as plain tensors (this rank's shards;
    row-parallel biases are zero on ranks other than 0)::

        h = x + residual;  a = o(attn(rope(qkv(norm_in(h)))));  h2 = a + h
        out = down(silu(gate(norm_post(h2))) * up(norm_post(h2)))    -> (out, h2)

    Under tensor parallelism ``a`` and ``out`` are partial sums that
    ``all_reduce`` completes. ``attention`` is the layer's PagedAttention
    (its cache index, scale, window and KV scales). A projection whose
    weight stays in a GGUF block format (``pllm.models.quant``) gives its
    one ``GGUFWeight``; a layer whose projections mix several segments in
    one weight gives no ``DenseDecoderWeights`` at all."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    eps: float
    qkv_weight: torch.Tensor | GGUFWeight
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor | GGUFWeight
    o_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor | GGUFWeight
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor | GGUFWeight
    down_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_cos: torch.Tensor  # [max_positions, head_dim / 2], fp32
    rotary_sin: torch.Tensor
    attention: PagedAttention
    all_reduce: object  # callable: completes a partial sum over the ranks (identity on one)
    tp_size: int


class FusedDecoderLayer(Protocol):
    """A platform's whole-layer implementation: ``(out, residual)`` as the
    layer's modules would return, or None to let them run this step."""

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                 ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor] | None: ...
