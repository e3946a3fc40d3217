"""Model loading: HF folders (safetensors, sharded or not) and GGUF files.

    loaded = load_model()                      # the default model (SmolLM2-135M-Instruct GGUF)
    loaded = load_model("path/to/hf-folder")   # config.json + model.safetensors(.index.json)
    for name, tensor in loaded.weights(): ...  # HF names, streamed shard by shard

A GGUF file is converted once into a safetensors cache under
``$PLLM_CACHE_DIR`` (default ``~/.cache/pllm``) keyed by the file's content:
its matrices in the block formats pllm multiplies stay as their raw blocks
(``LoadedModel.weight_formats``; ``weights()`` yields them as
``pllm.models.quant.GGUFWeight``), the rest is dequantized to float32.
"""

from pllm.loader.cache import CACHE_DIR_ENV, cache_root
from pllm.loader.load import default_model_path, load_model
from pllm.loader.loaded_model import (
    DEFAULT_MODEL,
    SUPPORTED_ARCHITECTURES,
    LoadedModel,
    ModelLoadError,
)

__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_MODEL",
    "SUPPORTED_ARCHITECTURES",
    "LoadedModel",
    "ModelLoadError",
    "cache_root",
    "default_model_path",
    "load_model",
]
