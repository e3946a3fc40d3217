"""GGUF files: converted once into a cached Hugging Face folder, then loaded as one.

Families (GGUF architecture -> HF model_type): llama (Mixtral when it has
experts), qwen2, qwen3, qwen2moe, qwen3moe, gemma2, gemma3 (-> gemma3_text).

Conversion (the config: gguf_config.py):
  config, tokenizer  transformers' own GGUF support (AutoConfig / AutoTokenizer with gguf_file),
                     then what its mapping drops or gets wrong set from the file's metadata
                     the way llama.cpp reads it (expert sizes, Gemma's window, soft-caps,
                     layer pattern, query scale and rope); a key that cannot be derived
                     and is missing is a ModelLoadError naming it
  tensors            gguf.GGUFReader, renamed to HF names with gguf's tensor-name map:
                     matrices in the formats pllm multiplies as they are (GGUF_FORMATS) kept
                     as their raw blocks, uint8 [rows, row_bytes], their formats listed in
                     the safetensors metadata (QUANT_FORMATS_KEY); the rest dequantized to
                     float32 with gguf.quants. Q/K rows un-permuted for llama (Mixtral
                     too; whole rows of blocks move, so raw blocks un-permute as well);
                     Gemma's norms minus the 1 llama.cpp adds; stacked experts
                     ([num_experts, ...]) split into HF's per-expert tensors
  result             <cache>/gguf/<stem>-<fingerprint>-v<N>-transformers<major>/ with
                     config.json, tokenizer files, generation_config.json and model.safetensors
                     (98 MB for SmolLM2-135M's Q4_1 file, as the file's own tensors)

The cached folder is written under a temporary name and renamed into place, so
a crash mid-conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pllm.loader.cache import cache_root, file_fingerprint
from pllm.loader.gguf_config import architecture, field, fixed_config
from pllm.loader.hf_folder import SINGLE_WEIGHTS_FILE, check_architecture
from pllm.loader.loaded_model import ModelLoadError
from pllm.loader.tokenizer import as_token_ids
from pllm.models.quant import GGUF_FORMATS

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# Bump when the converted folder's content changes, so stale caches are not reused.
CONVERSION_VERSION = 2
# The safetensors metadata key listing the tensors kept in a GGUF block
# format: a JSON object {hf_name: format name}.
QUANT_FORMATS_KEY = "pllm.gguf_formats"

# GGUF architecture names of the supported model types (mistral and mixtral
# are written as "llama").
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "gemma2", "gemma3")
# llama.cpp's converter permutes Q/K rows only for these GGUF architectures
# (mistral and mixtral checkpoints are written as "llama"); the others are stored as in HF.
_PERMUTED_ARCHITECTURES = ("llama",)
# Gemma's RMSNorm scales by 1 + weight, llama.cpp's by the weight: its
# converter adds 1 to every norm weight (q/k norms included).
_NORM_PLUS_ONE_ARCHITECTURES = ("gemma2", "gemma3")
# An expert's tensor in an HF checkpoint: "<layer>.experts.<index>.<projection>".
_EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)")
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


def dequantized_folder(gguf_path: str) -> str:
    """An HF folder of ``gguf_path`` with every tensor in float32, for tools
    that read plain checkpoints (transformers baselines, llama.cpp's
    converter); made once from the cached conversion and kept beside it."""
    import torch
    from safetensors.torch import save_file

    from pllm.loader.hf_folder import find_weight_files, iter_safetensors, quantized_formats
    from pllm.models.quant import GGUFWeight

    source = Path(converted_folder(gguf_path))
    target = source.with_name(f"{source.name}-float32")
    if (target / SINGLE_WEIGHTS_FILE).is_file():
        return str(target)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.name != SINGLE_WEIGHTS_FILE:
                shutil.copy2(item, staging / item.name)
        files = find_weight_files(str(source))
        tensors = {name: (t.dequantize() if isinstance(t, GGUFWeight) else t).to(torch.float32)
                   for name, t in iter_safetensors(files, quantized_formats(files))}
        save_file(tensors, str(staging / SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})
        try:
            staging.rename(target)
        except OSError:
            if not (target / SINGLE_WEIGHTS_FILE).is_file():
                raise
    except OSError as e:
        raise ModelLoadError(f"{gguf_path}: cannot write a float32 copy to {target}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def open_gguf(path: str) -> GGUFReader:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
    arch = architecture(reader)
    if arch not in _GGUF_ARCHITECTURES:
        check_architecture(arch, f"{path} (general.architecture)")
        # A family pllm runs from HF folders only: transformers' GGUF mapping
        # drops what it needs (Phi-3's LongRoPE factors and partial rotary, ...).
        raise ModelLoadError(f"{path} (general.architecture): {arch!r} is supported from an HF "
                             f"folder, not from GGUF; GGUF files: {', '.join(_GGUF_ARCHITECTURES)} "
                             f"(llama with experts: Mixtral)")
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
    config = fixed_config(reader, config)
    check_architecture(config.model_type, gguf_path)

    tensors, formats = {}, {}
    for hf_name, weights, fmt in file_tensors(reader, config):
        tensors[hf_name] = torch.from_numpy(np.array(weights, order="C"))  # off the memmap
        if fmt is not None:
            formats[hf_name] = fmt
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=_end_of_generation_ids(reader, config)
    ).save_pretrained(out_dir)
    # Written last: its presence marks the folder complete.
    save_file(tensors, os.path.join(out_dir, SINGLE_WEIGHTS_FILE),
              metadata={"format": "pt", QUANT_FORMATS_KEY: json.dumps(formats)})


def file_tensors(
    reader: GGUFReader, config: PretrainedConfig
) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """(hf_name, array, format) for every tensor the HF model has, in HF
    layout: a matrix in one of GGUF_FORMATS as its raw blocks (uint8
    ``[rows, row_bytes]``) with its format's name, anything else as float32
    with None."""
    from gguf.quants import dequantize

    arch = architecture(reader)
    expected = _hf_names_by_gguf_name(arch, config)
    seen = set()
    for tensor in reader.tensors:
        if tensor.name not in expected:
            if tensor.name not in _IGNORED_TENSORS:
                logger.warning("Ignoring GGUF tensor %s: no matching HF parameter", tensor.name)
            continue
        hf_name, shape = expected[tensor.name]
        fmt = tensor.tensor_type.name
        if fmt in GGUF_FORMATS and len(shape) >= 2 and shape[-2] > 1:
            weights = np.asarray(tensor.data)  # raw blocks: [..., rows, row_bytes]
            logical = (*weights.shape[:-1], _row_values(fmt, weights.shape[-1]))
        else:
            fmt = None
            weights = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            logical = weights.shape
        if tuple(logical) != shape and _squeezed(logical) == _squeezed(shape):
            weights = weights.reshape(shape)  # Qwen2-MoE's shared-expert gate: [hidden]
            logical = shape
        if tuple(logical) != shape:
            raise ModelLoadError(
                f"{reader.data.filename}: tensor {tensor.name} has shape {tuple(logical)}, "
                f"the config implies {shape} for {hf_name}"
            )
        if arch in _PERMUTED_ARCHITECTURES:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                weights = unpermute_rows(weights, config.num_attention_heads)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                weights = unpermute_rows(weights, config.num_key_value_heads)
        if arch in _NORM_PLUS_ONE_ARCHITECTURES and hf_name.endswith("norm.weight"):
            weights = weights - 1  # norms are never kept in blocks (1-D)
        seen.add(tensor.name)
        if "{expert}" in hf_name:  # stacked experts: one HF tensor each
            for expert, expert_weights in enumerate(weights):
                yield hf_name.format(expert=expert), expert_weights, fmt
        else:
            yield hf_name, weights, fmt
    missing = sorted((gguf_name, hf.format(expert="*")) for gguf_name, (hf, _) in expected.items()
                     if gguf_name not in seen)
    if config.tie_word_embeddings:  # tied: the model reuses the embedding
        missing = [(gguf_name, hf) for gguf_name, hf in missing if hf != "lm_head.weight"]
    if missing:
        raise ModelLoadError(
            f"{reader.data.filename} lacks {len(missing)} tensor(s) the model needs, "
            f"e.g. {missing[0][0]} (for {missing[0][1]})"
        )


def _row_values(fmt: str, row_bytes: int) -> int:
    from pllm.models.quant import block_size

    values, nbytes = block_size(fmt)
    return row_bytes // nbytes * values


def _squeezed(shape: tuple) -> tuple:
    return tuple(n for n in shape if n != 1)


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
    """GGUF tensor name -> (HF parameter name, shape), from a weightless model of ``config``
    in the layout HF checkpoints have. A stacked expert tensor maps to a name with an
    ``{expert}`` field and the shape [num_experts, *one expert's shape]."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # The model's module imported before the meta device is entered: importing
    # it under the device (a torch function mode) can import torch._dynamo
    # there, which fails half-way on torch 2.8.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    mapping = {}
    for hf_name, param in _checkpoint_layout(model).items():
        base, _, suffix = hf_name.rpartition(".")
        shape = tuple(param.shape)
        expert = _EXPERT_TENSOR.fullmatch(base)
        if expert:  # llama.cpp stacks the layer's experts: "<layer>.experts.<projection>"
            if expert[2] != "0":
                continue
            base = f"{expert[1]}.{expert[3]}"
            hf_name = f"{expert[1]}.{{expert}}.{expert[3]}.{suffix}"
            shape = (num_experts, *shape)
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = (hf_name, shape)
    return mapping


def _checkpoint_layout(model) -> dict:
    """``model``'s state dict named as HF checkpoints name it: transformers 5
    holds experts stacked (``mlp.experts.gate_up_proj``) and renames some
    modules, and undoes both when saving; 4.x holds the checkpoint's layout."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4
        return model.state_dict()
    return revert_weight_conversion(model, model.state_dict())


def _end_of_generation_ids(reader: GGUFReader, config: PretrainedConfig) -> list[int]:
    # llama.cpp stops on eos and on the end-of-turn / end-of-message tokens.
    ids = as_token_ids(config.eos_token_id)
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        value = field(reader, key)
        if value is not None:
            ids.append(int(value))
    return list(dict.fromkeys(ids))
