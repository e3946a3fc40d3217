"""Tokenizer, chat template and the token ids that start and end generation."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from pllm.loader.hf_folder import read_json
from pllm.loader.loaded_model import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

GENERATION_CONFIG_FILE = "generation_config.json"
# Where a folder may keep its template besides tokenizer_config.json, newest format first.
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a folder or a .gguf file (converted by transformers)."""
    from transformers import AutoTokenizer

    if not os.path.exists(source):
        raise ModelLoadError(f"tokenizer {source} does not exist")
    try:
        if source.endswith(".gguf") and os.path.isfile(source):
            folder, name = os.path.split(os.path.abspath(source))
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except Exception as e:  # transformers raises several types for one missing file
        raise ModelLoadError(
            f"{source}: cannot load a tokenizer (expected tokenizer.json and "
            f"tokenizer_config.json, or pass tokenizer=...): {e}"
        ) from e
    if not tokenizer.is_fast:
        raise ModelLoadError(f"{source}: only a slow tokenizer is available; pllm needs tokenizer.json")
    return tokenizer


def read_chat_template_arg(value: str) -> str:
    """The ``chat_template`` argument: a path to a template file, or the Jinja text itself."""
    if os.path.isfile(value):
        return _read_template_file(value)
    if "{" not in value and value.endswith((".jinja", ".j2", ".json", ".txt")):
        raise ModelLoadError(f"chat template file {value} does not exist")
    return value


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, folder: str | None, override: str | None
) -> str | None:
    """Override, else the tokenizer's own template, else a template file in ``folder``."""
    if override is not None:
        return read_chat_template_arg(override)
    template = _pick_default(getattr(tokenizer, "chat_template", None))
    if template is None and folder is not None:
        for name in _TEMPLATE_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return _read_template_file(path)
    return template


def _read_template_file(path: str) -> str:
    if path.endswith(".json"):
        template = _pick_default(read_json(path).get("chat_template"))
        if template is None:
            raise ModelLoadError(f"{path} has no 'chat_template' string")
        return template
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read chat template {path}: {e}") from e


def _pick_default(template: object) -> str | None:
    # A folder may carry several named templates; "default" is the one for chat.
    if isinstance(template, dict):
        template = template.get("default")
    elif isinstance(template, list):  # the older [{"name": ..., "template": ...}] form
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def generation_eos_ids(folder: str) -> list[int]:
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return []
    return as_token_ids(read_json(path).get("eos_token_id"))


def collect_eos_ids(
    config: PretrainedConfig, generation_eos: list[int], tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """config, generation_config, then tokenizer eos ids; first occurrence kept."""
    ids = as_token_ids(getattr(config, "eos_token_id", None)) + list(generation_eos)
    ids += as_token_ids(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def as_token_ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int)]
    raise ModelLoadError(f"eos_token_id must be an int or a list of ints, got {json.dumps(value)}")
