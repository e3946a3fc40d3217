"""The HF config of a GGUF file: transformers' own GGUF mapping, then what
it drops or gets wrong set from the file's metadata the way llama.cpp reads
it (Mixtral's experts, Qwen-MoE's expert sizes, Gemma's window, soft-caps,
layer pattern, query scale and rope). A key that cannot be derived and is
missing is a ModelLoadError naming the file and the key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pllm.loader.loaded_model import ModelLoadError

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PretrainedConfig


def fixed_config(reader: GGUFReader, config: PretrainedConfig) -> PretrainedConfig:
    """``config`` corrected from the file's metadata as llama.cpp reads it
    (a new config where the model type changes: llama with experts is Mixtral)."""
    arch = architecture(reader)
    # transformers maps no GGUF key to head_dim for qwen2/qwen3, leaving the
    # config class default (qwen3: 128) even where the file says otherwise.
    key_length = field(reader, f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length)
    if arch == "llama" and field(reader, "llama.expert_count"):
        return _as_mixtral(reader, config)
    if arch in ("qwen2moe", "qwen3moe"):
        _fix_qwen_moe(reader, config, arch)
    elif arch in ("gemma2", "gemma3"):
        _fix_gemma(reader, config, arch)
    return config


def _as_mixtral(reader: GGUFReader, config: PretrainedConfig) -> PretrainedConfig:
    # transformers' "llama" mapping reads no expert keys: a Llama config comes back.
    from transformers import AutoConfig

    values = {k: v for k, v in config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version",
                           "pretraining_tp", "attention_bias", "mlp_bias")}
    return AutoConfig.for_model(
        "mixtral", **values,
        num_local_experts=int(required(reader, "llama.expert_count")),
        num_experts_per_tok=int(required(reader, "llama.expert_used_count")),
    )


def _fix_qwen_moe(reader: GGUFReader, config: PretrainedConfig, arch: str) -> None:
    # transformers maps the expert counts but drops the experts' widths,
    # leaving the config class defaults; a missing count would do the same.
    config.num_experts = int(required(reader, f"{arch}.expert_count"))
    config.num_experts_per_tok = int(required(reader, f"{arch}.expert_used_count"))
    config.moe_intermediate_size = int(required(reader, f"{arch}.expert_feed_forward_length"))
    if arch == "qwen2moe":
        config.shared_expert_intermediate_size = int(
            required(reader, "qwen2moe.expert_shared_feed_forward_length"))
    # llama.cpp renormalises the top-k weights of qwen3moe, not of qwen2moe,
    # unless the file says otherwise.
    norm = field(reader, f"{arch}.expert_weights_norm")
    config.norm_topk_prob = bool(norm) if norm is not None else arch == "qwen3moe"


def _fix_gemma(reader: GGUFReader, config: PretrainedConfig, arch: str) -> None:
    """What llama.cpp derives from the architecture and size rather than the
    file: the layer pattern (Gemma 2: every 2nd layer global; Gemma 3: every
    6th), Gemma 3's local rope base (10k) and the query scale (the 27B
    models: hidden / heads; the others: head_dim)."""
    layers = config.num_hidden_layers
    big = layers == (46 if arch == "gemma2" else 62)
    config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads if big
                                    else config.head_dim)
    # Gemma 3 without a window: every layer global (llama.cpp's reading too).
    window = (required if arch == "gemma2" else field)(reader, f"{arch}.attention.sliding_window")
    period = 2 if arch == "gemma2" else 6
    config.layer_types = [
        "sliding_attention" if window and (i + 1) % period else "full_attention"
        for i in range(layers)
    ]
    config.sliding_window = int(window) if window else None
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = field(reader, f"{arch}.{key}")
        if value is not None:  # else llama.cpp's defaults, the config class's too
            setattr(config, key, float(value))
    if arch == "gemma3":
        _set_gemma3_rope(reader, config)


def _set_gemma3_rope(reader: GGUFReader, config: PretrainedConfig) -> None:
    # Global layers: the file's base and scaling; local ones: plain, base 10k.
    full = {"rope_type": "default",
            "rope_theta": float(field(reader, "gemma3.rope.freq_base") or 10000.0)}
    scaling = field(reader, "gemma3.rope.scaling.type")
    if scaling == "linear":
        full = {**full, "rope_type": "linear",
                "factor": float(required(reader, "gemma3.rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{reader.data.filename} (gemma3.rope.scaling.type): {scaling!r} "
                             f"is not supported; supported: none, linear")
    local_theta = float(field(reader, "gemma3.rope.freq_base_swa") or 10000.0)
    if hasattr(config, "rope_parameters"):  # transformers 5: per kind of layer
        config.rope_parameters = {
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
            "full_attention": full,
        }
    else:  # transformers 4
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local_theta
        config.rope_scaling = ({"rope_type": "linear", "factor": full["factor"]}
                               if "factor" in full else None)


def architecture(reader: GGUFReader) -> str | None:
    """``general.architecture``."""
    value = field(reader, "general.architecture")
    return str(value) if value is not None else None


def required(reader: GGUFReader, key: str):
    """The value of metadata ``key``; a ModelLoadError naming it if absent."""
    value = field(reader, key)
    if value is None:
        raise ModelLoadError(f"{reader.data.filename} lacks the metadata key {key}, which "
                             f"pllm needs and cannot derive")
    return value


def field(reader: GGUFReader, key: str):
    """The value of metadata ``key``, or None if the file has no such key."""
    entry = reader.get_field(key)
    return None if entry is None else entry.contents()

