"""GGUF files: converted once into a cached Hugging Face folder, then loaded as one.

Conversion:
  config, tokenizer  transformers' own GGUF support (AutoConfig / AutoTokenizer with gguf_file)
  tensors            gguf.GGUFReader + gguf.quants.dequantize -> float32, renamed to HF names
                     with gguf's tensor-name map, Q/K rows un-permuted for llama
  result             <cache>/gguf/<stem>-<fingerprint>-v<N>-transformers<major>/ with
                     config.json, tokenizer files, generation_config.json and model.safetensors

The cached folder is written under a temporary name and renamed into place, so
a crash mid-conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from pllm.loader.cache import cache_root, file_fingerprint
from pllm.loader.hf_folder import SINGLE_WEIGHTS_FILE, check_architecture
from pllm.loader.loaded_model import ModelLoadError
from pllm.loader.tokenizer import as_token_ids

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# Bump when the converted folder's content changes, so stale caches are not reused.
CONVERSION_VERSION = 1

# GGUF architecture names of the supported model types (mistral is written as "llama").
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's converter permutes Q/K rows only for these GGUF architectures
# (mistral checkpoints are written as "llama"); qwen2/qwen3 are stored as in HF.
_PERMUTED_ARCHITECTURES = ("llama",)
# GGUF tensors with no HF parameter: llama3 rope frequencies are recomputed from the config.
_IGNORED_TENSORS = ("rope_freqs.weight",)


def _writer() -> str:
    """The transformers major release writing the folder's tokenizer files:
    each reads only its own (an environment pinned to transformers 4, such as
    IPEX's, beside one on 5 must not share a conversion)."""
    import transformers

    return f"transformers{transformers.__version__.split('.')[0]}"


def converted_folder(gguf_path: str) -> str:
    """The cached HF folder for ``gguf_path``, converting the file on first use."""
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    try:
        key = f"{stem}-{file_fingerprint(gguf_path)}-v{CONVERSION_VERSION}-{_writer()}"
    except OSError as e:
        raise ModelLoadError(f"cannot read {gguf_path}: {e}") from e
    target = cache_root() / "gguf" / key
    if (target / SINGLE_WEIGHTS_FILE).is_file():
        logger.info("Using the cached conversion of %s at %s", gguf_path, target)
        return str(target)

    started = time.perf_counter()
    # Parsing the metadata is slow (seconds for a 50k-token vocabulary): only on a miss.
    reader = open_gguf(gguf_path)
    staging = target.with_name(f"{key}.tmp-{os.getpid()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        _convert(gguf_path, reader, str(staging))
        try:
            staging.rename(target)
        except OSError:
            if not (target / SINGLE_WEIGHTS_FILE).is_file():  # not a lost race with a twin
                raise
    except OSError as e:
        raise ModelLoadError(
            f"{gguf_path}: cannot write the converted model to {target}: {e} "
            f"(set PLLM_CACHE_DIR to a writable folder)"
        ) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "Converted %s to safetensors in %.1f s (cached at %s)",
        gguf_path, time.perf_counter() - started, target,
    )
    return str(target)


def open_gguf(path: str) -> GGUFReader:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _architecture(reader)
    if arch not in _GGUF_ARCHITECTURES:
        check_architecture(arch, f"{path} (general.architecture)")
        # A family pllm runs from HF folders only: transformers' GGUF mapping
        # drops what it needs (Phi-3's LongRoPE factors and partial rotary, ...).
        raise ModelLoadError(f"{path} (general.architecture): {arch!r} is supported from an HF "
                             f"folder, not from GGUF; GGUF files: {', '.join(_GGUF_ARCHITECTURES)}")
    return reader


def _convert(gguf_path: str, reader: GGUFReader, out_dir: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises several types for one bad file
        raise ModelLoadError(f"{gguf_path}: transformers cannot read its metadata: {e}") from e
    check_architecture(config.model_type, gguf_path)
    _apply_metadata_fixes(reader, config)

    tensors = {
        hf_name: torch.from_numpy(weights) for hf_name, weights in dequantized_tensors(reader, config)
    }
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=_end_of_generation_ids(reader, config)
    ).save_pretrained(out_dir)
    # Written last: its presence marks the folder complete.
    save_file(tensors, os.path.join(out_dir, SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})


def dequantized_tensors(
    reader: GGUFReader, config: PretrainedConfig
) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, float32 array in HF layout) for every tensor the HF model has."""
    from gguf.quants import dequantize

    arch = _architecture(reader)
    expected = _hf_names_by_gguf_name(arch, config)
    seen = set()
    for tensor in reader.tensors:
        if tensor.name not in expected:
            if tensor.name not in _IGNORED_TENSORS:
                logger.warning("Ignoring GGUF tensor %s: no matching HF parameter", tensor.name)
            continue
        hf_name, shape = expected[tensor.name]
        weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tuple(weights.shape) != shape:
            raise ModelLoadError(
                f"{reader.data.filename}: tensor {tensor.name} has shape {tuple(weights.shape)}, "
                f"the config implies {shape} for {hf_name}"
            )
        if arch in _PERMUTED_ARCHITECTURES:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                weights = unpermute_rows(weights, config.num_attention_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                weights = unpermute_rows(weights, config.num_key_value_heads)
        seen.add(tensor.name)
        yield hf_name, weights
    missing = sorted(hf for gguf_name, (hf, _) in expected.items() if gguf_name not in seen)
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        missing.remove("lm_head.weight")  # tied: the model reuses the embedding
    if missing:
        raise ModelLoadError(
            f"{reader.data.filename} lacks {len(missing)} tensor(s) the model needs, "
            f"e.g. {missing[0]}"
        )


def unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: per head it stores rows as [even dims..., odd dims...]
    interleaved pairwise; HF's rotate_half wants the first and second halves instead.

        llama.cpp:  reshape(heads, 2, half, ...).swapaxes(1, 2)   (HF -> GGUF)
        here:       reshape(heads, half, 2, ...).swapaxes(1, 2)   (GGUF -> HF)
    """
    half = weights.shape[0] // num_heads // 2
    rows = weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(rows.reshape(weights.shape))


def _hf_names_by_gguf_name(arch: str, config: PretrainedConfig) -> dict[str, tuple[str, tuple]]:
    """GGUF tensor name -> (HF parameter name, shape), from a weightless model of ``config``."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    mapping = {}
    for hf_name, param in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = (hf_name, tuple(param.shape))
    return mapping


def _apply_metadata_fixes(reader: GGUFReader, config: PretrainedConfig) -> None:
    # transformers maps no GGUF key to head_dim for qwen2/qwen3, leaving the
    # config class default (qwen3: 128) even where the file says otherwise.
    key_length = _field(reader, f"{_architecture(reader)}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length)


def _end_of_generation_ids(reader: GGUFReader, config: PretrainedConfig) -> list[int]:
    # llama.cpp stops on eos and on the end-of-turn / end-of-message tokens.
    ids = as_token_ids(config.eos_token_id)
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = _field(reader, key)
        if value is not None:
            ids.append(int(value))
    return list(dict.fromkeys(ids))


def _architecture(reader: GGUFReader) -> str | None:
    value = _field(reader, "general.architecture")
    return str(value) if value is not None else None


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()

