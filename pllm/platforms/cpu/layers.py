"""The CPU platform's versions of the model's small per-layer ops, on the
fused kernels of ``csrc/fused.cpp``: RMSNorm with the residual add folded in,
SiLU-and-mul, and rotary embedding in place; and, for decode-only steps of
up to 128 sequences, the whole decoder layer in one compiled call
(``csrc/decode_layer.cpp``), given to each dense decoder layer through the
models' documented hook (``pllm.models.layers.FusedDecoderLayer``).

In a batch-1 decode step of SmolLM2-135M the eager ops they replace (about
a dozen per layer: pow, mean, rsqrt, casts, slices, cat, ...) cost more time
than the attention itself. Each class subclasses a shared building block of
``pllm.models.layers`` and falls back to its torch code when the kernels are
unavailable or the dtype is not fp32, so outputs never depend on whether
the compiler was there.
"""

from __future__ import annotations

import torch
from torch import nn

from pllm.models.layers import DenseDecoderWeights, RMSNorm, RotaryEmbedding, SiluAndMul
from pllm.platforms.cpu.attention import COMPILED_KV_DTYPES, CPUAttentionBackend
from pllm.platforms.cpu.kernels import cpu_ops
from pllm.platforms.cpu.linear import _FEW_ROWS, _SMALL_BATCH


def _fp32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 for t in tensors)


class CPURMSNorm(RMSNorm):
    def forward(self, x, residual=None):
        ops = cpu_ops()
        if ops is None or not _fp32(x, self.weight) or (residual is not None and not _fp32(residual)):
            return super().forward(x, residual)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if residual is None:
            return ops.rms_norm(x2, self.weight, self.eps).view(shape)
        residual = residual.contiguous()
        out = ops.add_rms_norm_(x2, residual.view(-1, shape[-1]), self.weight, self.eps)
        return out.view(shape), residual


class CPUSiluAndMul(SiluAndMul):
    def forward(self, x):
        ops = cpu_ops()
        if ops is None or not _fp32(x) or x.dim() != 2:
            return super().forward(x)
        return ops.silu_and_mul(x)  # keeps x's layout (row- or column-major)


class CPURotaryEmbedding(RotaryEmbedding):
    def forward(self, positions, q, k):
        ops = cpu_ops()
        if (ops is None or not _fp32(q, k, self.cos) or self.head_dim % 2
                or self.rotary_dim != self.head_dim):  # partial rotary: the reference path
            return super().forward(positions, q, k)
        # Views of a column-major QKV product (a mid-size batch) get their
        # own rows first: the kernel rotates contiguous head vectors in place.
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        ops.rotary_(q, k, positions, self.cos, self.sin)
        return q, k


_FUSED_OVER_PACKED = 12


class CPUFusedDecodeLayer:
    """A decoder layer's hook (``pllm.models.layers.FusedDecoderLayer``): a
    decode-only step of up to ``_SMALL_BATCH`` sequences runs the layer in
    one compiled call (two under tensor parallelism, an all-reduce after
    each), with the products CPULinear would pick, or with ``gguf_linear``'s
    when the four projections keep their weights in GGUF blocks, over an
    fp32 or 8-bit (e4m3fn, e5m2) cache. Anything else (prefill chunks,
    larger batches, other dtypes or backends) it declines, and the layer's
    modules run. Beside fp32 weights packed for every batch size (``packed``:
    MKL's or oneDNN's copies) it takes up to ``_FUSED_OVER_PACKED`` rows, all
    on ``linear_small``; beyond that the modules' packed products beat this
    call's unpacked ones by more than the modules' overhead. Decode steps of
    SmolLM2-135M on a 2-core AVX-512 Xeon (MKL's copies): 12 rows 43.0 ms
    here against 44.9 through the modules, 16 rows 54.8 against 49.3, 64
    rows 110.7 against 98.6; on a 2-core AVX-512 EPYC (oneDNN's), engine
    steps of 8 rows took 24.4 ms against 30.3, of 12 rows 35.9-37.7
    against 35.8."""

    def __init__(self, weights: DenseDecoderWeights, *, packed: bool = False) -> None:
        w = weights
        self.attention, self.all_reduce, self.tp_size = w.attention, w.all_reduce, w.tp_size
        self.blocks = _in_blocks(w)
        self.max_rows = _SMALL_BATCH
        # decode_layer's constant arguments, gathered once.
        if self.blocks:
            from pllm.platforms.cpu.gguf_linear import FEW_ROWS, activations_from_env, qtype_id

            activations = activations_from_env()
            self.few_rows = FEW_ROWS[activations]
            self.tail = (activations == "q8", self.few_rows)
            projections = []
            for weight, bias in ((w.qkv_weight, w.qkv_bias), (w.o_weight, w.o_bias),
                                 (w.gate_up_weight, w.gate_up_bias), (w.down_weight, w.down_bias)):
                projections.append((weight.data, qtype_id(weight.format), bias))
            self.qkv, self.o, self.gate_up, self.down = projections
            self.args = (w.input_norm, w.post_attention_norm, w.eps, *self.qkv, *self.o,
                         *self.gate_up, *self.down, w.down_weight.shape[1], w.num_heads,
                         w.num_kv_heads, w.head_dim, w.rotary_cos, w.rotary_sin)
        else:
            self.few_rows = _FUSED_OVER_PACKED if packed else _FEW_ROWS
            if packed:
                self.max_rows = self.few_rows
            self.args = (w.input_norm, w.post_attention_norm, w.eps, w.qkv_weight, w.qkv_bias,
                         w.o_weight, w.o_bias, w.gate_up_weight, w.gate_up_bias, w.down_weight,
                         w.down_bias, w.num_heads, w.num_kv_heads, w.head_dim, w.rotary_cos,
                         w.rotary_sin)

    @staticmethod
    def applies_to(weights: DenseDecoderWeights) -> bool:
        """fp32 weights, or all four projections in GGUF blocks; a head_dim
        the kernel's vector loop takes and no attention soft-cap."""
        w = weights
        projections = (w.qkv_weight, w.o_weight, w.gate_up_weight, w.down_weight)
        return (w.head_dim % 8 == 0 and w.attention.soft_cap is None
                and _fp32(w.input_norm, w.rotary_cos)
                and (_in_blocks(w) or all(isinstance(p, torch.Tensor) and _fp32(p)
                                          for p in projections)))

    def __call__(self, positions, x, residual, ctx):
        md = ctx.metadata
        ops = cpu_ops()
        if (ops is None or md.num_decodes != md.num_seqs or x.shape[0] > self.max_rows
                or x.dtype != torch.float32 or not isinstance(ctx.backend, CPUAttentionBackend)):
            return None
        attn = self.attention
        cache = ctx.kv_caches[attn.layer_idx]
        if cache.dtype not in COMPILED_KV_DTYPES:
            return None
        window = attn.sliding_window or 0
        # k_scale / v_scale: what an 8-bit cache holds K, V divided by (unused with fp32).
        kv = (cache, attn.k_scale, attn.v_scale, md.slot_mapping, md.block_tables, md.seq_lens)
        if self.blocks:
            return self._blocks_call(ops, positions, x, residual, kv, attn.scale, window)
        if self.tp_size == 1:
            return ops.decode_layer(x, residual, positions, *self.args, *kv, attn.scale, window,
                                    self.few_rows)
        # Tensor parallelism: the two halves, each followed by its all-reduce.
        (in_norm, post_norm, eps, qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b,
         heads, kv_heads, head_dim, cos, sin) = self.args
        o, residual = ops.decode_layer_attn(
            x, residual, positions, in_norm, eps, qkv_w, qkv_b, o_w, o_b, heads, kv_heads, head_dim,
            cos, sin, *kv, attn.scale, window, self.few_rows)
        down, residual = ops.decode_layer_mlp(self.all_reduce(o), residual, post_norm, eps,
                                              gate_up_w, gate_up_b, down_w, down_b, self.few_rows)
        return self.all_reduce(down), residual

    def _blocks_call(self, ops, positions, x, residual, kv, scale, window):
        if self.tp_size == 1:
            return ops.gguf_decode_layer(x, residual, positions, *self.args, *kv, scale, window,
                                         *self.tail)
        in_norm, post_norm, eps = self.args[:3]
        intermediate, heads, kv_heads, head_dim, cos, sin = self.args[-6:]
        o, residual = ops.gguf_decode_layer_attn(
            x, residual, positions, in_norm, eps, *self.qkv, *self.o, heads, kv_heads, head_dim,
            cos, sin, *kv, scale, window, *self.tail)
        down, residual = ops.gguf_decode_layer_mlp(
            self.all_reduce(o), residual, post_norm, eps, *self.gate_up, *self.down, intermediate,
            *self.tail)
        return self.all_reduce(down), residual


def _in_blocks(w: DenseDecoderWeights) -> bool:
    """Whether all four projections keep their weights in GGUF blocks."""
    from pllm.models.quant import GGUFWeight

    return all(isinstance(p, GGUFWeight)
               for p in (w.qkv_weight, w.o_weight, w.gate_up_weight, w.down_weight))


_SWAPS = {RMSNorm: CPURMSNorm, SiluAndMul: CPUSiluAndMul, RotaryEmbedding: CPURotaryEmbedding}


def use_cpu_layers(model: nn.Module, *, fuse_decode_layers: bool = True) -> nn.Module:
    """Give each RMSNorm, SiluAndMul and RotaryEmbedding in ``model`` its CPU
    class, in place (the module object, its parameters, its buffers and
    every reference to it, such as the rotary table the layers share, stay;
    only the forward changes), and, unless ``fuse_decode_layers`` is False
    (``--enforce-eager``), each plain dense decoder layer its one-call decode
    hook. Both go through the hooks ``pllm.models.layers`` documents."""
    for module in model.modules():
        cpu_cls = _SWAPS.get(type(module))
        if cpu_cls is not None:
            module.__class__ = cpu_cls
    if fuse_decode_layers and hasattr(model, "decoder_layers"):
        for layer in model.decoder_layers():
            weights = layer.dense_weights() if hasattr(layer, "dense_weights") else None
            if weights is not None and CPUFusedDecodeLayer.applies_to(weights):
                packed = any(getattr(m, "every_batch", False) for m in layer.modules())
                layer.fused = CPUFusedDecodeLayer(weights, packed=packed)
    return model
