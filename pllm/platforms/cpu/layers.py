"""The CPU platform's versions of the model's small per-layer ops, on the
fused kernels of ``csrc/fused.cpp``: RMSNorm with the residual add folded in,
SiLU-and-mul, and rotary embedding in place; and, for decode-only steps of
up to 128 sequences, the whole decoder layer in one compiled call
(``csrc/decode_layer.cpp``).

In a batch-1 decode step of SmolLM2-135M the eager ops they replace (about
a dozen per layer: pow, mean, rsqrt, casts, slices, cat, ...) cost more time
than the attention itself. Each class subclasses the model's module and
falls back to its torch code when the kernels are unavailable or the dtype
is not fp32, so outputs never depend on whether the compiler was there.
"""

from __future__ import annotations

import torch
from torch import nn

from pllm.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from pllm.models.llama import DecoderLayer
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
        if ops is None or not _fp32(q, k, self.cos) or self.head_dim % 2:
            return super().forward(positions, q, k)
        # Views of a column-major QKV product (a mid-size batch) get their
        # own rows first: the kernel rotates contiguous head vectors in place.
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k.stride(-1) == 1 else k.contiguous()
        ops.rotary_(q, k, positions, self.cos, self.sin)
        return q, k


class CPUDecoderLayer(DecoderLayer):
    """A decode-only step of up to ``_SMALL_BATCH`` sequences runs the layer
    in one compiled call (two under tensor parallelism, an all-reduce after
    each), with the products CPULinear would pick, over an fp32 or 8-bit
    (e4m3fn, e5m2) cache; anything else (prefill chunks, larger batches,
    q/k norms, other dtypes) goes through the modules one by one."""

    def forward(self, positions, x, residual, ctx):
        md = ctx.metadata
        ops = cpu_ops()
        weights = self._fused_weights()
        if (ops is None or weights is None or md.num_decodes != md.num_seqs or x.shape[0] > _SMALL_BATCH
                or x.dtype != torch.float32 or not isinstance(ctx.backend, CPUAttentionBackend)):
            return super().forward(positions, x, residual, ctx)
        attn = self.self_attn.attn
        cache = ctx.kv_caches[attn.layer_idx]
        if cache.dtype not in COMPILED_KV_DTYPES:
            return super().forward(positions, x, residual, ctx)
        window = attn.sliding_window or 0
        # k_scale / v_scale: what an 8-bit cache holds K, V divided by (unused with fp32).
        kv = (cache, attn.k_scale, attn.v_scale, md.slot_mapping, md.block_tables, md.seq_lens)
        if self.self_attn.tp.size == 1:
            return ops.decode_layer(x, residual, positions, *weights, *kv, attn.scale, window,
                                    _FEW_ROWS)
        # Tensor parallelism: the two halves, each followed by its all-reduce.
        (in_norm, post_norm, eps, qkv_w, qkv_b, o_w, o_b, gate_up_w, gate_up_b, down_w, down_b,
         heads, kv_heads, head_dim, cos, sin) = weights
        tp = self.self_attn.tp
        o, residual = ops.decode_layer_attn(
            x, residual, positions, in_norm, eps, qkv_w, qkv_b, o_w, o_b, heads, kv_heads, head_dim,
            cos, sin, *kv, attn.scale, window, _FEW_ROWS)
        down, residual = ops.decode_layer_mlp(tp.all_reduce(o), residual, post_norm, eps,
                                              gate_up_w, gate_up_b, down_w, down_b, _FEW_ROWS)
        return tp.all_reduce(down), residual

    def _fused_weights(self) -> tuple | None:
        """The layer's constant arguments of ``decode_layer``, gathered once
        (about 30 attribute lookups through nn.Module per call otherwise), or
        None where the fused layer does not apply."""
        cached = self.__dict__.get("_fused_args")
        if cached is None:
            attn, mlp = self.self_attn, self.mlp
            spec = attn.spec
            params = [attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight,
                      mlp.down_proj.weight, self.input_layernorm.weight, attn.rotary.cos]
            if spec.qk_norm or spec.head_dim % 8 or not _fp32(*params):
                cached = ()
            else:
                cached = (
                    self.input_layernorm.weight, self.post_attention_layernorm.weight,
                    self.input_layernorm.eps,
                    attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
                    mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, mlp.down_proj.weight,
                    mlp.down_proj.bias, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                    attn.rotary.cos, attn.rotary.sin,
                )
            self.__dict__["_fused_args"] = cached
        return cached or None


_SWAPS = {RMSNorm: CPURMSNorm, SiluAndMul: CPUSiluAndMul, RotaryEmbedding: CPURotaryEmbedding,
          DecoderLayer: CPUDecoderLayer}


def use_cpu_layers(model: nn.Module, *, fuse_decode_layers: bool = True) -> nn.Module:
    """Give each RMSNorm, SiluAndMul, RotaryEmbedding and (unless
    ``fuse_decode_layers`` is False: ``--enforce-eager``) DecoderLayer in
    ``model`` its CPU class, in place. The swap keeps the module object (its parameters, its
    buffers and every reference to it, such as the rotary table the layers
    share); only the forward changes."""
    swaps = dict(_SWAPS)
    if not fuse_decode_layers:
        del swaps[DecoderLayer]
    for module in model.modules():
        cpu_cls = swaps.get(type(module))
        if cpu_cls is not None:
            module.__class__ = cpu_cls
    return model
