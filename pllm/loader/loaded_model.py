"""What a loaded model hands the engine, and the error every loading failure raises."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# model_type values the pllm model definitions implement.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe",
                           "qwen3_moe", "gemma2", "gemma3_text")


class ModelLoadError(ValueError):
    """A model folder or file cannot be loaded; the message names the file and the reason."""


@dataclass
class LoadedModel:
    path: str  # the folder or .gguf file actually loaded
    name: str  # display / served name
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase  # always a fast tokenizer
    chat_template: str | None
    eos_token_ids: list[int]  # every id that ends generation, deduplicated
    bos_token_id: int | None
    # {HF name: GGUF format} of the tensors stored in a block format (a .gguf
    # file's); ``weights()`` yields those as ``pllm.models.quant.GGUFWeight``.
    weight_formats: dict[str, str] = field(default_factory=dict)
    weight_names: tuple[str, ...] = ()  # every tensor ``weights()`` yields
    # Yields (hf_name, tensor) on each call; kept out of repr and comparisons.
    _weight_source: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(
        default=lambda: iter(()), repr=False, compare=False
    )

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF parameter names and tensors in their stored dtype, one shard at a
        time; a tensor in a GGUF block format as a ``GGUFWeight``
        (``weight_formats``; its ``dequantize()`` gives the values).

        A tied ``lm_head.weight`` that the checkpoint does not store is not yielded.
        """
        return self._weight_source()
