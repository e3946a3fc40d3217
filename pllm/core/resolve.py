"""The engine config's "decide for me" values, decided once against the
platform's capabilities and the model, and every refusal a platform's
capabilities imply, before anything is built::

    dtype "auto"            -> the platform's default_dtype
    max_model_len None      -> the model's context (max_position_embeddings)
    block_size None         -> the platform's default_block_size
    kv_cache_dtype          -> cache_dtype: the model dtype, or the platform's
                               8-bit format of that name
    quantization "auto"     -> "gguf" for a model stored in GGUF block formats
                               the platform multiplies (weight_formats); "none"
                               otherwise, or when a dtype is given. A kept or
                               rounded model ("gguf", "int8", "fp8") runs in an
                               activation dtype of weight_format_dtypes
    static shapes (buckets) -> max_num_batched_tokens and max_num_seqs at most
                               the largest token and sequence bucket (logged)

A value the platform cannot run (a dtype, block size, head_dim, sliding
window or cache format it lacks) is a ``ValueError`` naming what it can.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from pllm.core.config import EngineConfig
from pllm.core.interfaces import Platform
from pllm.core.kv_cache.fp8 import resolve_kv_cache_dtype

logger = logging.getLogger("pllm")

DEFAULT_CONTEXT = 2048
# --quantization int8: per-channel int8 weights stored as Q8_0 blocks (one
# scale repeated along each row), so that the Q8_0 kernels run them.
INT8_FORMAT = "Q8_0"  # for a model config that states none


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_model_fits(model, platform: Platform) -> None:
    """Raises ``ValueError`` naming what of ``model`` (a ``ModelInfo``: the
    served model's, or a draft model's) the platform cannot run."""
    caps, name = platform.capabilities, platform.name
    if not caps.supports_head_dim(model.head_dim):
        raise ValueError(f"head_dim={model.head_dim} is not supported on {name}; "
                         f"supported: {', '.join(map(str, caps.head_dims or ()))}")
    if model.sliding_window is not None and not caps.supports_sliding_window:
        raise ValueError(f"this {model.model_type} model uses a sliding window of "
                         f"{model.sliding_window} tokens, which {name} attention does not support")
    if getattr(model, "attn_soft_cap", None) is not None and not caps.supports_soft_cap:
        raise ValueError(f"this {model.model_type} model soft-caps its attention logits "
                         f"(at {model.attn_soft_cap}), which {name} attention does not support")
    if getattr(model, "dynamic_routing", False) and caps.static_shapes:
        raise ValueError(f"this {model.model_type} model routes tokens to experts by their "
                         f"values (data-dependent shapes), which {name}'s static-shape "
                         "compilation does not support yet")


def _check_activations(quantization: str, dtype: str, platform: Platform, instead: str) -> None:
    allowed = platform.capabilities.weight_format_dtypes
    if dtype != "auto" and getattr(torch, dtype) not in allowed:
        raise ValueError(f"quantization={quantization!r}: {platform.name}'s kernels multiply "
                         f"with {_names(allowed)} activations; dtype={dtype} needs {instead}")


def quantized_dtype(dtype: str, platform: Platform) -> torch.dtype:
    """The activation dtype of a model whose weights stay quantized: the
    given one, else the platform's default when its kernels take it, else
    the first they take."""
    caps = platform.capabilities
    if dtype != "auto":
        return getattr(torch, dtype)
    allowed = caps.weight_format_dtypes
    return caps.default_dtype if caps.default_dtype in allowed else allowed[0]


def resolve_quantization(quantization: str, dtype: str, model, platform: Platform) -> str:
    """"gguf", "int8", "fp8" or "none" for the user's ``quantization`` and
    ``dtype`` and a model (``ModelInfo``) stored in ``model.weight_formats``;
    a ``ValueError`` for "gguf" where nothing could stay quantized, or a
    choice the platform cannot multiply."""
    from pllm.models.quant import FP8_FORMAT

    caps, name = platform.capabilities, platform.name
    formats = set(getattr(model, "weight_formats", ()))
    runs = sorted(formats & set(caps.weight_formats))
    others = sorted(formats - set(caps.weight_formats))
    multiplies = ", ".join(caps.weight_formats) or "none"
    if quantization == "auto":
        if not formats:
            return "none"
        if dtype != "auto":
            logger.info("dtype=%s given: the GGUF weights (%s) are dequantized to it at load",
                        dtype, ", ".join(sorted(formats)))
            return "none"
        if not runs:
            logger.warning("%s multiplies none of this model's GGUF formats (%s; it multiplies: "
                           "%s): the weights are dequantized at load", name,
                           ", ".join(sorted(formats)), multiplies)
            return "none"
        quantization = "gguf"
    if quantization == "none":
        return "none"
    if quantization in ("int8", "fp8"):
        needs, how = {"int8": (INT8_FORMAT, f"as {INT8_FORMAT} blocks with one scale per output "
                               "channel"),
                      "fp8": (FP8_FORMAT, "as fp8 e4m3 with one scale per output channel, and "
                              "multiplies them with fp8 activations")}[quantization]
        if needs not in caps.weight_formats:
            raise ValueError(f"quantization={quantization!r} stores weights {how}, which {name} "
                             f"does not multiply (it multiplies: {multiplies})")
        _check_activations(quantization, dtype, platform, "quantization='none'")
        return quantization
    if not formats:
        raise ValueError("quantization='gguf' keeps a .gguf file's quantized tensors in their "
                         "formats; this model has none (an HF folder, or a file of float tensors)")
    if not runs:
        raise ValueError(f"quantization='gguf': {name} multiplies none of this model's GGUF "
                         f"formats ({', '.join(sorted(formats))}); it multiplies: {multiplies} "
                         f"(quantization='none' dequantizes them at load)")
    _check_activations("gguf", dtype, platform,
                       f"quantization='none' (the weights dequantized to {dtype})")
    if others:
        logger.warning("%s does not multiply GGUF %s (it does: %s): those tensors are "
                       "dequantized at load", name, ", ".join(others), multiplies)
    return "gguf"


def resolve_config(config: EngineConfig, platform: Platform, model) -> EngineConfig:
    """``config`` with every value decided; ``model`` is the
    ``pllm.models.ModelInfo`` of the model to run (one rank's share)."""
    caps, name = platform.capabilities, platform.name
    mc, cc = config.model, config.cache

    quantization = resolve_quantization(mc.quantization, mc.dtype, model, platform)
    dtype = (quantized_dtype(mc.dtype, platform) if quantization != "none" else
             caps.default_dtype if mc.dtype == "auto" else getattr(torch, mc.dtype))
    if not caps.supports_dtype(dtype):
        raise ValueError(f"dtype={mc.dtype!r} is not supported on {name}; "
                         f"supported: {_names(caps.dtypes)}")

    model_max = model.max_position_embeddings or DEFAULT_CONTEXT
    if mc.max_model_len and mc.max_model_len > model_max:
        raise ValueError(f"max_model_len={mc.max_model_len} exceeds the model's context ({model_max})")
    max_model_len = mc.max_model_len or model_max

    block_size = cc.block_size or caps.default_block_size
    if not caps.supports_block_size(block_size):
        raise ValueError(f"block_size={block_size} is not supported on {name}; "
                         f"supported: {', '.join(map(str, caps.block_sizes))}")
    check_model_fits(model, platform)
    cache_dtype = resolve_kv_cache_dtype(cc.kv_cache_dtype, dtype, caps, name)

    sched = config.scheduler
    if caps.static_shapes:
        # Every step must fit a compiled bucket: no step larger than the largest.
        tokens = min(sched.max_num_batched_tokens, caps.token_buckets[-1])
        seqs = min(sched.max_num_seqs, caps.seq_buckets[-1])
        if (tokens, seqs) != (sched.max_num_batched_tokens, sched.max_num_seqs):
            logger.warning("%s compiles steps of at most %d tokens and %d sequences: "
                           "max_num_batched_tokens %d -> %d, max_num_seqs %d -> %d", name,
                           caps.token_buckets[-1], caps.seq_buckets[-1],
                           sched.max_num_batched_tokens, tokens, sched.max_num_seqs, seqs)
            sched = dataclasses.replace(sched, max_num_batched_tokens=tokens, max_num_seqs=seqs)

    return dataclasses.replace(
        config,
        scheduler=sched,
        model=dataclasses.replace(mc, dtype=str(dtype).removeprefix("torch."),
                                  max_model_len=max_model_len, quantization=quantization),
        cache=dataclasses.replace(cc, block_size=block_size,
                                  cache_dtype=str(cache_dtype).removeprefix("torch.")),
    )
