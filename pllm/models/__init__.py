"""Model definitions: plain torch modules that call the platform's attention."""

from __future__ import annotations

from pllm.models.llama import LlamaForCausalLM

# HF model_type -> model class.
MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def get_model_class(model_type: str):
    try:
        return MODEL_REGISTRY[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
