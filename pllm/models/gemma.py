"""Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's differences,
each read from the config: the embedding scaled by sqrt(hidden); RMSNorm by
``1 + weight``; a GELU-tanh MLP; norms before and after both attention and
the MLP; attention scaled by ``query_pre_attn_scalar``; sliding-window and
global layers interleaved (``layer_types``); tied embeddings; and a final
logit soft-cap where the config sets one.

Gemma 2 soft-caps the attention logits (``attn_logit_softcapping``): the
attention backend applies it (``supports_soft_cap``; a platform without it
refuses the model by name). Gemma 3 has q/k norms instead, and each layer
kind its own rope parameters (local: base 10k; global: base 1M, scaled)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pllm.models.layers import ForwardContext, RotaryEmbedding
from pllm.models.llama import ArchSpec, Attention, LlamaForCausalLM
from pllm.models.parallel import SINGLE, WHOLE, PipelineStage, TensorParallel


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by ``1 + weight``, computed in fp32 (Gemma's)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class GemmaSpec(ArchSpec):
    qk_norm_cls = GemmaRMSNorm

    def __init__(self, cfg, tp_size: int = 1) -> None:
        super().__init__(cfg, tp_size)
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention is not supported (a causal LM only)")
        gemma3 = cfg.model_type != "gemma2"
        self.qk_norm = gemma3  # Gemma 3's q/k norms ...
        self.rope_per_layer_type = gemma3  # ... and rope parameters by kind of layer
        self.attn_soft_cap = getattr(cfg, "attn_logit_softcapping", None) or None
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.layer_types = _layer_types(cfg)
        window = getattr(cfg, "sliding_window", None)
        self.sliding_window = window if window and "sliding_attention" in self.layer_types else None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)

    def _check_activation(self, cfg) -> None:
        act = getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation={act!r} is not supported (only gelu_pytorch_tanh)")

    def window_of(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None


def _layer_types(cfg) -> list[str]:
    """Each layer's kind; configs from transformers 4 give a period instead
    (Gemma 3: every ``sliding_window_pattern``-th layer global, the others
    local; Gemma 2: even layers local, odd ones global)."""
    kinds = getattr(cfg, "layer_types", None)
    if kinds:
        return list(kinds)
    if cfg.model_type == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(cfg.num_hidden_layers)]
    period = getattr(cfg, "sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
            for i in range(cfg.num_hidden_layers)]


class GemmaMLP(nn.Module):
    def __init__(self, spec: GemmaSpec, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(spec.hidden, 2 * spec.intermediate, bias=False)
        self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.gelu(gate, approximate="tanh") * up))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, spec: GemmaSpec, idx: int, rotary: RotaryEmbedding,
                 tp: TensorParallel = SINGLE, cache_index: int | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(spec, idx, rotary, tp, cache_index)
        self.mlp = GemmaMLP(spec, tp)
        self.input_layernorm = GemmaRMSNorm(spec.hidden, spec.eps)
        self.post_attention_layernorm = GemmaRMSNorm(spec.hidden, spec.eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(spec.hidden, spec.eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(spec.hidden, spec.eps)
        self.fused = None  # no platform's one-call layer fits Gemma's four norms

    def forward(self, positions, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), ctx))
        x = x + h
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + h

    def dense_weights(self) -> None:
        return None


class GemmaForCausalLM(LlamaForCausalLM):
    """Loading, tensor parallelism (heads and MLP columns split, the LM head
    by vocabulary) and tied embeddings as the Llama family's."""

    spec_class = GemmaSpec

    def __init__(self, hf_config, max_positions: int, tp: TensorParallel = SINGLE,
                 stage: PipelineStage = WHOLE) -> None:
        nn.Module.__init__(self)
        self.spec = spec = GemmaSpec(hf_config, tp.size)
        self.tp, self.stage = tp, stage.for_model(hf_config.num_hidden_layers)
        stage = self.stage
        if spec.rope_per_layer_type:
            rotaries = {kind: RotaryEmbedding(hf_config, spec.head_dim, max_positions,
                                              layer_type=kind)
                        for kind in sorted(set(spec.layer_types))}
        else:  # Gemma 2: one rope for every layer
            shared = RotaryEmbedding(hf_config, spec.head_dim, max_positions)
            rotaries = {kind: shared for kind in set(spec.layer_types)}
        self.rotaries = nn.ModuleDict(rotaries)
        self.embed_tokens = self._on_stage(self._holds_embedding,
                                           lambda: nn.Embedding(hf_config.vocab_size, spec.hidden))
        self.layers = nn.ModuleList(
            self._on_stage(stage.holds(i), lambda i=i, kind=kind: GemmaDecoderLayer(
                spec, i, rotaries[kind], tp, cache_index=i - stage.first_layer))
            for i, kind in enumerate(spec.layer_types))
        self.norm = self._on_stage(stage.is_last, lambda: GemmaRMSNorm(spec.hidden, spec.eps))
        self.vocab_size = hf_config.vocab_size
        self.vocab_lo, self.vocab_hi = tp.vocab_range(self.vocab_size)
        self.lm_head = self._on_stage(stage.is_last, lambda: nn.Linear(
            spec.hidden, self.vocab_hi - self.vocab_lo, bias=False))
        self.embed_scale = spec.hidden ** 0.5

    @property
    def rotary(self) -> "_AllRotaries":
        return _AllRotaries(list(self.rotaries.values()))

    def forward(self, input_ids, positions, ctx: ForwardContext,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        if self.stage.is_first:
            x = self.embed_tokens(input_ids)
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)  # rounded to the dtype, as HF
        else:
            x = intermediate
        for layer in self.decoder_layers():
            x = layer(positions, x, ctx)
        return self.norm(x) if self.stage.is_last else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.spec.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


class _AllRotaries:
    """``model.rotary.reset_tables()`` for a model with one table per layer kind."""

    def __init__(self, rotaries: list[RotaryEmbedding]) -> None:
        self.rotaries = rotaries

    def reset_tables(self) -> None:
        for rotary in self.rotaries:
            rotary.reset_tables()
