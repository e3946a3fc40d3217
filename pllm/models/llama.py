"""The Llama family: Llama 2/3, SmolLM2, Mistral (sliding window), Qwen2 (QKV
bias), Qwen3 (q/k norm), Phi-3 / Phi-4-mini (Q/K/V and gate/up fused in the
checkpoint, LongRoPE, partial rotary). One flat token batch, no padding;
Q/K/V and gate/up run as one fused matmul each (weights fused at load time
where the checkpoint has them apart)."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from pllm.models.layers import (
    DenseDecoderWeights,
    ForwardContext,
    FusedDecoderLayer,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
)
from pllm.models.moe import MoEBlock, MoESpec
from pllm.models.parallel import (
    SINGLE,
    WHOLE,
    OnAnotherStage,
    PipelineStage,
    TensorParallel,
    divide,
    kv_head_split,
)
from pllm.models.quant import QuantEmbedding, QuantLinear, block_size, cat_rows

logger = logging.getLogger("pllm")

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


class ArchSpec:
    """The differences between family members, read from the HF config.

    Head counts and the MLP width are one rank's share under tensor
    parallelism over ``tp_size`` ranks (KV heads replicated when there are
    fewer than ranks); ``total_*`` are the model's."""

    def __init__(self, cfg, tp_size: int = 1) -> None:
        self.model_type = cfg.model_type
        self.hidden = cfg.hidden_size
        self.total_heads = cfg.num_attention_heads
        self.total_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.total_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.total_heads
        self.total_intermediate = cfg.intermediate_size
        self.tp_size = tp_size
        self.num_heads = divide(self.total_heads, tp_size, "the number of attention heads")
        self.num_kv_heads = kv_head_split(self.total_kv_heads, tp_size)
        self.intermediate = divide(self.total_intermediate, tp_size, "intermediate_size")
        self.eps = cfg.rms_norm_eps
        qwen2 = cfg.model_type in ("qwen2", "qwen2_moe")
        self.qkv_bias = (bool(getattr(cfg, "qkv_bias", True)) if qwen2
                         else bool(getattr(cfg, "attention_bias", False)))
        self.o_bias = not qwen2 and bool(getattr(cfg, "attention_bias", False))
        self.mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        self.qk_norm = cfg.model_type in ("qwen3", "qwen3_moe")
        # Mixture of experts (pllm.models.moe): the layers it names have
        # experts in place of the dense MLP.
        self.moe = MoESpec(cfg, tp_size) if cfg.model_type in MOE_TYPES else None
        self.tie = bool(getattr(cfg, "tie_word_embeddings", False))
        window = getattr(cfg, "sliding_window", None)
        uses_window = (cfg.model_type in ("mistral", "phi3", "mixtral")
                       or getattr(cfg, "use_sliding_window", False))
        # A window no shorter than the context (Phi-4-mini's) is no window.
        context = getattr(cfg, "max_position_embeddings", None)
        self.sliding_window = (window if uses_window and window and not (context and window >= context)
                               else None)
        self.scale = self.head_dim ** -0.5  # of the attention logits
        self._check_activation(cfg)

    # The q/k norms' class (Qwen3's; Gemma's scales by 1 + weight).
    qk_norm_cls = RMSNorm
    # Attention logit soft-cap (Gemma 2's): the backend applies it.
    attn_soft_cap: float | None = None

    def window_of(self, layer_idx: int) -> int | None:
        """Layer ``layer_idx``'s sliding window (None: it attends to all)."""
        return self.sliding_window

    def _check_activation(self, cfg) -> None:
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only silu)")


class Attention(nn.Module):
    """``cache_index``: which of the stage's KV caches the layer uses
    (default ``layer_idx``: a model in one pipeline stage)."""

    def __init__(self, spec: ArchSpec, layer_idx: int, rotary: RotaryEmbedding,
                 tp: TensorParallel = SINGLE, cache_index: int | None = None) -> None:
        super().__init__()
        self.spec, self.tp = spec, tp
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(spec.hidden, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, spec.hidden, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = spec.qk_norm_cls(spec.head_dim, spec.eps)
            self.k_norm = spec.qk_norm_cls(spec.head_dim, spec.eps)
        self.rotary = rotary
        self.attn = PagedAttention(layer_idx if cache_index is None else cache_index, spec.scale,
                                   spec.window_of(layer_idx), spec.attn_soft_cap)

    def forward(self, positions, x, ctx: ForwardContext) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.spec.num_heads, self.spec.head_dim)
        k = k.reshape(n, self.spec.num_kv_heads, self.spec.head_dim)
        v = v.reshape(n, self.spec.num_kv_heads, self.spec.head_dim)
        if self.spec.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, ctx)
        return self.tp.all_reduce(self.o_proj(out.reshape(n, self.q_size)))


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(spec.hidden, 2 * spec.intermediate, bias=spec.mlp_bias)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.act(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ArchSpec, idx: int, rotary: RotaryEmbedding,
                 tp: TensorParallel = SINGLE, cache_index: int | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(spec, idx, rotary, tp, cache_index)
        sparse = spec.moe is not None and spec.moe.is_sparse(idx)
        self.mlp = MoEBlock(spec.hidden, spec.moe, tp) if sparse else MLP(spec, tp)
        self.input_layernorm = RMSNorm(spec.hidden, spec.eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden, spec.eps)
        self.fused: FusedDecoderLayer | None = None  # a platform's hook (pllm.models.layers)

    def forward(self, positions, x, residual, ctx):
        """Returns ``(mlp_out, residual)``: the next layer's norm adds them
        (HF adds first, then normalises: the same sums in the same order)."""
        if self.fused is not None:
            out = self.fused(positions, x, residual, ctx)
            if out is not None:
                return out
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def dense_weights(self) -> DenseDecoderWeights | None:
        """This layer as plain tensors; None when it is not a plain dense
        layer (q/k norms: Qwen3; partial rotary: Phi-4-mini; experts)."""
        attn, mlp, spec = self.self_attn, self.mlp, self.self_attn.spec
        if spec.qk_norm or attn.rotary.rotary_dim != spec.head_dim or isinstance(mlp, MoEBlock):
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        weights = [linear.weight if not isinstance(linear, QuantLinear) else
                   linear.segments[0] if len(linear.segments) == 1 else None for linear in linears]
        if any(w is None for w in weights):
            return None  # a projection of several segments (formats)
        qkv_weight, o_weight, gate_up_weight, down_weight = weights
        return DenseDecoderWeights(
            input_norm=self.input_layernorm.weight,
            post_attention_norm=self.post_attention_layernorm.weight, eps=self.input_layernorm.eps,
            qkv_weight=qkv_weight, qkv_bias=attn.qkv_proj.bias,
            o_weight=o_weight, o_bias=attn.o_proj.bias,
            gate_up_weight=gate_up_weight, gate_up_bias=mlp.gate_up_proj.bias,
            down_weight=down_weight, down_bias=mlp.down_proj.bias,
            num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
            rotary_cos=attn.rotary.cos, rotary_sin=attn.rotary.sin, attention=attn.attn,
            all_reduce=attn.tp.all_reduce, tp_size=attn.tp.size,
        )


class LlamaForCausalLM(nn.Module):
    """``tp``: this rank's place in a tensor-parallel group (see
    ``pllm.models.parallel``); the embedding and norms are whole on every
    rank, the LM head is split by vocabulary. ``stage``: the part of the
    model this rank's pipeline stage holds; the others' modules are
    ``OnAnotherStage`` places, so that every name stays the checkpoint's."""

    spec_class = ArchSpec

    def __init__(self, hf_config, max_positions: int, tp: TensorParallel = SINGLE,
                 stage: PipelineStage = WHOLE) -> None:
        super().__init__()
        self.spec = spec = ArchSpec(hf_config, tp.size)
        self.tp, self.stage = tp, stage.for_model(hf_config.num_hidden_layers)
        stage = self.stage
        rotary = RotaryEmbedding(hf_config, spec.head_dim, max_positions)
        self.embed_tokens = self._on_stage(self._holds_embedding,
                                           lambda: nn.Embedding(hf_config.vocab_size, spec.hidden))
        self.layers = nn.ModuleList(
            self._on_stage(stage.holds(i), lambda i=i: DecoderLayer(
                spec, i, rotary, tp, cache_index=i - stage.first_layer))
            for i in range(hf_config.num_hidden_layers))
        self.norm = self._on_stage(stage.is_last, lambda: RMSNorm(spec.hidden, spec.eps))
        self.vocab_size = hf_config.vocab_size
        self.vocab_lo, self.vocab_hi = tp.vocab_range(self.vocab_size)
        self.lm_head = self._on_stage(stage.is_last, lambda: nn.Linear(
            spec.hidden, self.vocab_hi - self.vocab_lo, bias=False))
        self.rotary = rotary

    @property
    def _holds_embedding(self) -> bool:
        """The first stage looks tokens up; a tied head reads the embedding."""
        return self.stage.is_first or (self.stage.is_last and self.spec.tie)

    @staticmethod
    def _on_stage(held: bool, make) -> nn.Module:
        return make() if held else OnAnotherStage()

    @property
    def num_layers(self) -> int:
        """This stage's layers (one KV-cache tensor each)."""
        return self.stage.num_layers

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.decoder_layers()]

    def decoder_layers(self) -> list[DecoderLayer]:
        """This stage's layers, for platform hooks (``dense_weights``, ``fused``)."""
        return list(self.layers[self.stage.first_layer:self.stage.last_layer])

    def forward(self, input_ids, positions, ctx: ForwardContext,
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` after the final norm; on a
        pipeline stage before the last, the residual stream after its layers
        (what the next stage takes as ``intermediate``, instead of the
        embedding)."""
        if self.stage.is_first:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate, None
        for layer in self.decoder_layers():
            x, residual = layer(positions, x, residual, ctx)
        if not self.stage.is_last:
            return x if residual is None else x + residual  # the sum the next norm would make
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head, only on the rows that are sampled (under tensor
        parallelism every rank calls this: each computes its vocabulary slice)."""
        return self.tp.gather_vocab(self.lm_head(hidden), self.vocab_size)

    def tie_weights(self) -> None:
        """With tied embeddings the LM head reads the embedding matrix (this
        rank's rows of it)."""
        if not self.spec.tie or not self.stage.is_last:
            return
        if isinstance(self.embed_tokens, QuantEmbedding):  # the head multiplies the blocks
            table = self.embed_tokens.table
            self.lm_head.load(table.narrow(0, self.vocab_lo, self.vocab_hi - self.vocab_lo),
                              share=True)
            return
        if self.tp.size == 1:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            rows = self.embed_tokens.weight.detach()[self.vocab_lo: self.vocab_hi]
            self.lm_head.weight = nn.Parameter(rows, requires_grad=False)

    # ---- weights -----------------------------------------------------------
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    _ROW_PARALLEL = ("o_proj", "down_proj")  # sharded along their input (dim 1)

    def quant_targets(self, formats: dict[str, str]) -> dict[str, str]:
        """{HF name: module path} of the tensors among ``formats`` ({HF name:
        GGUF format}) that can stay in their blocks: those of a linear layer
        or the embedding (not experts), whose rank's share of the input
        falls on block boundaries. A tied LM head follows the embedding."""
        targets, uneven = {}, []
        for name, fmt in formats.items():
            parts = name.removeprefix("model.").split(".")
            if parts[-1] != "weight" or len(parts) < 2:
                continue
            if parts[-2] in self._FUSED:
                parts[-2] = self._FUSED[parts[-2]][0]
            path = ".".join(parts[:-1])
            try:
                module = self.get_submodule(path)
            except AttributeError:
                continue
            width = (module.embedding_dim if isinstance(module, nn.Embedding) else
                     module.in_features if isinstance(module, nn.Linear) else None)
            if width is not None and width % block_size(fmt)[0] == 0:
                targets[name] = path
            elif width is not None:
                uneven.append(name)
        if uneven and self.tp.rank == 0:
            logger.info("%d weight(s) kept in full precision: this rank's rows of them do not "
                        "fill whole blocks (e.g. %s)", len(uneven), uneven[0])
        if self.spec.tie and self.stage.is_last and "embed_tokens" in targets.values():
            targets["lm_head.weight"] = "lm_head"
        return targets

    def holds_weight(self, name: str) -> bool:
        """Whether checkpoint tensor ``name`` belongs to a module this
        pipeline stage holds (every tensor, with one stage)."""
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
            index = int(parts[1])
            return index >= len(self.layers) or self.stage.holds(index)  # past the end: refused
        module = getattr(self, parts[0], None) if parts[0] in ("embed_tokens", "norm",
                                                                "lm_head") else None
        return not isinstance(module, OnAnotherStage)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Every parameter
        must be covered; an unknown name is an error, not silently dropped."""
        params = dict(self.named_parameters())
        self._quantized = {f"{path}.weight": module for path, module in self.named_modules()
                           if isinstance(module, (QuantLinear, QuantEmbedding))}
        if self.spec.tie:
            params.pop("lm_head.weight", None)
        loaded: set[str] = set()
        pending: dict[str, dict[int, torch.Tensor]] = {}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or not self.holds_weight(name):
                continue
            if name == "lm_head.weight" and self.spec.tie:
                continue  # tied: the embedding serves as the head
            parts = name.split(".")
            if self._load_kv_scale(parts, tensor):
                continue
            if self._load_expert(params, parts, tensor, pending, loaded):
                continue
            if len(parts) >= 2 and parts[-2] in self._SPLIT:
                # Fused in the checkpoint (Phi-3): taken apart into the pieces
                # other checkpoints have, each sharded and fused again below.
                for piece, chunk in zip(self._SPLIT[parts[-2]], self._split(parts[-2], tensor)):
                    self._load_piece(params, parts[:-2] + [piece, parts[-1]], chunk, pending,
                                     loaded)
                continue
            if len(parts) >= 2 and parts[-2] in self._FUSED:
                self._load_piece(params, parts, tensor, pending, loaded)
                continue
            if name not in params and name not in self._quantized:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.spec.model_type}")
            if name == "lm_head.weight":
                tensor = tensor.narrow(0, self.vocab_lo, self.vocab_hi - self.vocab_lo)
            elif len(parts) >= 2 and parts[-2] in self._ROW_PARALLEL:
                if parts[-1] == "weight":
                    tensor = self.tp.shard(tensor, 1)
                elif self.tp.rank:
                    tensor = torch.zeros_like(tensor)  # the all-reduce adds rank 0's bias once
            self._copy(params, name, tensor)
            loaded.add(name)
        if pending:
            raise ValueError(f"checkpoint lacks parts of: {', '.join(sorted(pending)[:8])}")
        expected = set(params) | set(self._quantized)
        if self.spec.tie:
            expected.discard("lm_head.weight")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks tensors: {', '.join(missing[:8])}")
        self.tie_weights()

    # An expert's tensors in a checkpoint (Mixtral's names, then Qwen-MoE's):
    # which of w13's halves (0 gate, 1 up) or w2 they are.
    _EXPERT = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0),
               "gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}

    def _load_expert(self, params, parts: list[str], tensor: torch.Tensor,
                     pending: dict, loaded: set[str]) -> bool:
        """A mixture-of-experts tensor: Mixtral's ``block_sparse_moe.*``
        (its router, ``experts.E.w1/w2/w3``), Qwen-MoE's ``mlp.experts.E.*``,
        or transformers' stacked ``mlp.experts.gate_up_proj / down_proj``;
        this rank's slice of each expert's intermediate dimension goes into
        the block's ``w13`` / ``w2``. False for any other tensor."""
        if len(parts) < 4 or parts[0] != "layers" or parts[2] not in ("block_sparse_moe", "mlp"):
            return False
        prefix = f"layers.{parts[1]}.mlp"
        rest = parts[3:]
        if parts[2] == "block_sparse_moe" and rest == ["gate", "weight"]:
            self._copy(params, f"{prefix}.gate.weight", tensor)
            loaded.add(f"{prefix}.gate.weight")
            return True
        if rest[0] != "experts":
            return False
        spec = self.spec.moe
        if spec is None:
            raise ValueError(f"checkpoint tensor {'.'.join(parts)!r} has no place in "
                             f"{self.spec.model_type}")
        if rest in (["experts", "gate_up_proj"], ["experts", "down_proj"]):  # stacked
            if rest[1] == "down_proj":
                self._copy(params, f"{prefix}.w2", self.tp.shard(tensor, 2))
            else:
                gate, up = tensor.chunk(2, dim=1)
                self._copy(params, f"{prefix}.w13", torch.cat(
                    [self.tp.shard(gate, 1), self.tp.shard(up, 1)], dim=1))
            loaded.add(f"{prefix}.{'w2' if rest[1] == 'down_proj' else 'w13'}")
            return True
        if len(rest) != 4 or not rest[1].isdigit() or rest[2] not in self._EXPERT:
            raise ValueError(f"checkpoint tensor {'.'.join(parts)!r} has no place in "
                             f"{self.spec.model_type}")
        expert, (target, half) = int(rest[1]), self._EXPERT[rest[2]]
        name = f"{prefix}.{target}"
        if name not in params or expert >= spec.num_experts:
            raise ValueError(f"checkpoint tensor {'.'.join(parts)!r} has no place in "
                             f"{self.spec.model_type}")
        shard = self.tp.shard(tensor, 1 if target == "w2" else 0)
        rows = spec.intermediate
        with torch.no_grad():
            dest = params[name][expert]
            if target == "w13":
                dest = dest[half * rows:(half + 1) * rows]
            if dest.shape != shard.shape:
                raise ValueError(f"{'.'.join(parts)}: checkpoint shape {tuple(tensor.shape)} "
                                 f"does not fit the config's experts")
            dest.copy_(shard)
        done = pending.setdefault(name, set())
        done.add((expert, half))
        if len(done) == spec.num_experts * (2 if target == "w13" else 1):
            pending.pop(name)
            loaded.add(name)
        return True

    # A checkpoint's fused tensor -> the pieces in _FUSED it holds, in order.
    _SPLIT = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def _split(self, fused: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec = self.spec
        if fused == "qkv_proj":
            q, kv = spec.total_heads * spec.head_dim, spec.total_kv_heads * spec.head_dim
            sizes = [q, kv, kv]
        else:
            sizes = [spec.total_intermediate] * 2
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"{fused}: checkpoint has {tensor.shape[0]} rows, the config "
                             f"says {sum(sizes)}")
        return tensor.split(sizes, dim=0)

    def _load_piece(self, params, parts: list[str], tensor: torch.Tensor,
                    pending: dict[str, dict[int, torch.Tensor]], loaded: set[str]) -> None:
        """One of q/k/v or gate/up: this rank's shard of it waits for its
        siblings, and all of them go into the fused parameter together."""
        fused, slot = self._FUSED[parts[-2]]
        target = ".".join(parts[:-2] + [fused, parts[-1]])
        pending.setdefault(target, {})[slot] = self._column_shard(fused, slot, tensor)
        if len(pending[target]) == (3 if fused == "qkv_proj" else 2):
            chunks = pending.pop(target)
            self._copy(params, target, cat_rows([chunks[i] for i in sorted(chunks)]))
            loaded.add(target)

    def _column_shard(self, fused: str, slot: int, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a column-parallel weight or bias: its heads of
        q/k/v (a replicated KV head when there are fewer than ranks), its
        columns of gate/up."""
        if fused != "qkv_proj" or slot == 0:
            return self.tp.shard(tensor, 0)
        lo, hi = self.tp.kv_head_range(self.spec.total_kv_heads)
        d = self.spec.head_dim
        return tensor.narrow(0, lo * d, (hi - lo) * d)

    # Per-layer scales of an 8-bit KV cache, under the names quantization
    # tools write them (``layers.N.self_attn.<suffix>``).
    _KV_SCALES = {"k_scale": ("k_scale",), "v_scale": ("v_scale",),
                  "kv_scale": ("k_scale", "v_scale"), "k_proj.output_scale": ("k_scale",),
                  "v_proj.output_scale": ("v_scale",)}

    def _load_kv_scale(self, parts: list[str], tensor: torch.Tensor) -> bool:
        """Set a layer's KV-cache scale from a checkpoint tensor of that name;
        False when ``parts`` names no such scale."""
        if len(parts) < 4 or parts[0] != "layers" or parts[2] != "self_attn":
            return False
        attrs = self._KV_SCALES.get(".".join(parts[3:]))
        if attrs is None:
            return False
        name = ".".join(parts)
        if tensor.numel() != 1:
            raise ValueError(f"{name}: only per-tensor KV-cache scales are supported, "
                             f"got shape {tuple(tensor.shape)}")
        value = float(tensor.float().reshape(()))
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{name}: a KV-cache scale must be finite and > 0, got {value}")
        if not parts[1].isdigit() or int(parts[1]) >= len(self.layers):
            raise ValueError(f"checkpoint tensor {name!r} has no place in {self.spec.model_type}")
        attn = self.layers[int(parts[1])].self_attn.attn
        for attr in attrs:
            setattr(attn, attr, value)
        attn.scales_from_checkpoint = True
        return True

    def _copy(self, params, name: str, tensor) -> None:
        quantized = getattr(self, "_quantized", {}).get(name)
        if quantized is not None:
            try:
                quantized.load(tensor)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            return
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in this model")
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
