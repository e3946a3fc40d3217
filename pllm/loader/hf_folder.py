"""A Hugging Face model folder: config.json, safetensors weights (single or sharded).

Everything that can be checked without reading tensor data is checked when the
folder is opened, so a broken checkpoint fails at load time with the file's
name rather than halfway through building the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pllm.loader.loaded_model import SUPPORTED_ARCHITECTURES, ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from pllm.models.quant import GGUFWeight

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_architecture(model_type: object, source: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: unsupported architecture {model_type!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def read_config(folder: str) -> PretrainedConfig:
    """config.json through AutoConfig, after checking it is JSON of a supported model_type."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        ggufs = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
        hint = f" (it holds {ggufs[0]}: pass that file's path)" if ggufs else ""
        raise ModelLoadError(f"{folder} has no {CONFIG_FILE}; not a model folder{hint}")
    check_architecture(read_json(path).get("model_type"), path)

    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:  # transformers raises several types for one bad file
        raise ModelLoadError(f"{path}: transformers cannot read this config: {e}") from e


def find_weight_files(folder: str) -> list[str]:
    """The safetensors files to load, in order; each one opened once to validate it."""
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_WEIGHTS_FILE)
    if os.path.isfile(index_path):
        return _shards_from_index(folder, index_path)
    if os.path.isfile(single_path):
        _tensor_names(single_path)
        return [single_path]
    others = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth")))
    found = f"; found only {', '.join(others)} (pllm reads safetensors)" if others else ""
    raise ModelLoadError(f"{folder} has no {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}{found}")


def _shards_from_index(folder: str, index_path: str) -> list[str]:
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path} has no 'weight_map' naming the shards")
    names_by_shard: dict[str, set[str]] = {}
    for tensor_name, shard in weight_map.items():
        names_by_shard.setdefault(shard, set()).add(tensor_name)
    shard_paths = []
    for shard in sorted(names_by_shard):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise ModelLoadError(f"{index_path} names shard {shard!r}, which is missing")
        missing = names_by_shard[shard] - _tensor_names(shard_path)
        if missing:
            raise ModelLoadError(
                f"{shard_path} lacks {len(missing)} tensor(s) that {INDEX_FILE} places there, "
                f"e.g. {sorted(missing)[0]!r}"
            )
        shard_paths.append(shard_path)
    return shard_paths


def tensor_names(paths: list[str]) -> list[str]:
    """Every tensor name in the files, from their headers."""
    return sorted(set().union(*(_tensor_names(path) for path in paths)))


def _tensor_names(path: str) -> set[str]:
    """Opens the file's header; safetensors rejects truncated or corrupt files here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e


def iter_safetensors(paths: list[str], formats: dict[str, str] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor | GGUFWeight]]:
    """Tensors file by file, so at most one shard is resident at a time; the
    ones ``formats`` names (``quantized_formats``) as ``GGUFWeight``."""
    from safetensors import SafetensorError, safe_open

    from pllm.models.quant import GGUFWeight

    formats = formats or {}
    for path in paths:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if name in formats:
                        try:
                            # Off the file's mapping: kept blocks are the model's memory.
                            tensor = GGUFWeight.from_blocks(tensor.clone(), formats[name])
                        except (ValueError, KeyError) as e:
                            raise ModelLoadError(f"{path}: tensor {name}: {e}") from e
                    yield name, tensor
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: cannot read tensors: {e}") from e


def quantized_formats(paths: list[str]) -> dict[str, str]:
    """{tensor name: GGUF format} of the tensors kept in block formats (a
    converted GGUF file's), from the files' metadata; empty for a plain checkpoint."""
    from safetensors import safe_open

    from pllm.loader.gguf_file import QUANT_FORMATS_KEY

    formats: dict[str, str] = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            listed = (f.metadata() or {}).get(QUANT_FORMATS_KEY)
        if listed:
            try:
                formats.update(json.loads(listed))
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{path}: metadata {QUANT_FORMATS_KEY} is not JSON: {e}") from e
    return formats
