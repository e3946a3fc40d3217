"""Model definitions: plain torch modules implementing the Model contract
(``pllm.core.interfaces.Model``) and calling the platform's attention.

The core reaches models through three functions only: :func:`describe_model`
(what the engine must know before it builds anything), :func:`build_model`
(a rank's shard with its weights loaded) and the contract's methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pllm.core.interfaces import Model
from pllm.core.kv_cache.fp8 import checkpoint_scale_factor, is_fp8
from pllm.models.gemma import GemmaForCausalLM
from pllm.models.llama import LlamaForCausalLM
from pllm.models.parallel import WHOLE, PipelineStage, TensorParallel
from pllm.models.quant import GGUFWeight, fp8_per_channel, int8_per_channel, quantize_modules

logger = logging.getLogger("pllm")

# HF model_type -> model class.
MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
    "mixtral": LlamaForCausalLM,
    "qwen2_moe": LlamaForCausalLM,
    "qwen3_moe": LlamaForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3_text": GemmaForCausalLM,
}


def get_model_class(model_type: str):
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None


@dataclass(frozen=True)
class ModelInfo:
    """What the engine checks and sizes before a model exists (one rank's share)."""

    model_type: str
    num_layers: int
    num_kv_heads: int  # this rank's
    head_dim: int
    sliding_window: int | None
    max_position_embeddings: int  # the model's own context; 0 when the config has none
    # Mixture of experts: how many tokens each expert computes depends on the
    # data (the step's shapes do), so no graph or static-shape compilation.
    dynamic_routing: bool = False
    # Attention logit soft-cap (Gemma 2): the attention backend must take ``soft_cap``.
    attn_soft_cap: float | None = None
    # The GGUF block formats its weights are stored in (a .gguf file's), sorted.
    weight_formats: tuple[str, ...] = ()
    # The residual stream's width: what pipeline stages pass each other per token.
    hidden_size: int = 0


def describe_model(hf_config, tp_size: int = 1, weight_formats: Iterable[str] = ()) -> ModelInfo:
    """Raises ``ValueError`` for an unsupported architecture, or a model whose
    heads do not split over ``tp_size`` ranks. ``weight_formats``: the
    formats of its quantized tensors (``LoadedModel.weight_formats``' values)."""
    spec = get_model_class(hf_config.model_type).spec_class(hf_config, tp_size)
    return ModelInfo(
        model_type=hf_config.model_type, num_layers=hf_config.num_hidden_layers,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        sliding_window=spec.sliding_window,
        max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 0) or 0),
        dynamic_routing=getattr(spec, "moe", None) is not None,
        attn_soft_cap=getattr(spec, "attn_soft_cap", None),
        weight_formats=tuple(sorted(set(weight_formats))),
        hidden_size=spec.hidden,
    )


def build_model(hf_config, weights: Iterable[tuple[str, torch.Tensor]], *, max_model_len: int,
                dtype: torch.dtype, device: torch.device, tp: TensorParallel,
                kv_cache_dtype: torch.dtype,
                prepare: Callable[[Model], Model] | None = None,
                quantized: dict[str, str] | None = None, round_to: str | None = None,
                stage: PipelineStage = WHOLE) -> Model:
    """This rank's shard of the model on ``device``, weights loaded, in eval
    mode; ``prepare`` (the platform's ``prepare_model``) runs last. ``stage``:
    the pipeline stage's part of the model (its layers, the embedding first,
    the norm and LM head last; ``pllm.models.parallel.PipelineStage``).

    ``quantized``: {HF name: GGUF format} of the tensors to keep in their
    block formats (``pllm.models.quant``); every other ``GGUFWeight`` among
    ``weights`` is dequantized as it loads (logged). ``round_to``
    (``"int8"`` or ``"fp8"``): the tensors named in ``quantized`` are
    rounded with one scale per output channel as they load
    (``int8_per_channel``, ``fp8_per_channel``), every GGUF block
    dequantized first."""
    cls = get_model_class(hf_config.model_type)
    with torch.device("meta"):
        model = cls(hf_config, max_positions=max_model_len, tp=tp, stage=stage)
    kept: dict[str, str] = {}
    if quantized:
        kept = model.quant_targets(quantized)
        quantize_modules(model, kept.values(), dtype)
    # Parameters take the model dtype before they take memory: the
    # checkpoint's tensors convert as they are copied in, so loading never
    # holds a second, wider copy of the weights.
    model = model.to(dtype).to_empty(device=device)
    model.rotary.reset_tables()  # fp32, as in transformers
    if model.stage.size > 1:  # another stage's tensors are neither converted nor logged here
        weights = ((name, tensor) for name, tensor in weights if model.holds_weight(name))
    if round_to is not None:
        weights = _round(_dequantize_others(weights, {}, log=tp.rank == 0), kept, round_to)
    else:
        weights = _dequantize_others(weights, kept, log=tp.rank == 0)
    model.load_weights(weights)
    _adapt_kv_scales(model, kv_cache_dtype)
    model = model.eval().requires_grad_(False)
    model.tie_weights()
    if tp.rank == 0 and is_fp8(kv_cache_dtype):
        _log_kv_scales(model, kv_cache_dtype)
    return prepare(model) if prepare is not None else model


_ROUNDINGS = {"int8": int8_per_channel, "fp8": fp8_per_channel}


def _round(weights, kept: dict, round_to: str):
    rounding = _ROUNDINGS[round_to]
    for name, tensor in weights:
        yield name, rounding(tensor) if name in kept else tensor


def _dequantize_others(weights: Iterable[tuple[str, torch.Tensor | GGUFWeight]], kept: dict,
                       log: bool):
    """``weights`` with every ``GGUFWeight`` not in ``kept`` dequantized,
    and one log line saying which were."""
    dequantized: dict[str, list[str]] = {}
    for name, tensor in weights:
        if isinstance(tensor, GGUFWeight) and name not in kept:
            dequantized.setdefault(tensor.format, []).append(name)
            tensor = tensor.dequantize()
        yield name, tensor
    if dequantized and log:
        counts = ", ".join(f"{len(v)} {f}" for f, v in dequantized.items())
        first = next(iter(dequantized.values()))[0]
        if kept:
            logger.info("GGUF tensors dequantized at load, as no kernel here takes them in "
                        "their blocks (a format the platform does not multiply, experts, or "
                        "a split off block boundaries): %s, e.g. %s", counts, first)
        else:
            logger.info("GGUF tensors dequantized at load: %s", counts)


def _adapt_kv_scales(model: Model, kv_cache_dtype: torch.dtype) -> None:
    """Checkpoint KV scales (made for e4m3fn) fitted to the cache's format."""
    factor = checkpoint_scale_factor(kv_cache_dtype)
    if factor == 1.0:
        return
    for attn in model.attention_layers():
        if attn.scales_from_checkpoint:
            attn.k_scale *= factor
            attn.v_scale *= factor


def _log_kv_scales(model: Model, kv_cache_dtype: torch.dtype) -> None:
    name = str(kv_cache_dtype).removeprefix("torch.")
    if all(not a.scales_from_checkpoint for a in model.attention_layers()):
        logger.warning("KV cache in %s with scales 1.0 (the checkpoint gives none): keys "
                       "or values beyond the format's range are clipped", name)
    else:
        logger.info("KV cache in %s with the checkpoint's per-layer scales", name)
