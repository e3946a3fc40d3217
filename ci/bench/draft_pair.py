"""Target and draft pairs for measuring draft-model speculation (there is
no published draft for SmolLM2-135M).

``OUT/target`` and ``OUT/draft``: a random Llama of about a third of
SmolLM2's size whose layers after the first two are scaled down to add
little to the residual stream, and as its draft those first two layers with
the same embedding, norm and LM head. The draft costs about a sixth of the
target per token and agrees with it often, not always: the mechanics.

``OUT/smollm2-first-8-layers``: SmolLM2-135M cut after its 8th of 30
layers, a draft from real weights (which a cut model is not good at).

    python ci/bench/draft_pair.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pllm.loader.gguf_file import dequantized_folder
from pllm.loader.load import default_model_path
from pllm.loader.testing import make_tiny_model


def _first_layers(src: Path | str, dst: Path, num_layers: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def main(out: Path) -> None:
    target = out / "target"
    if not (target / "config.json").exists():
        make_tiny_model(target, hidden_size=576, intermediate_size=1536, num_hidden_layers=12,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                        max_position_embeddings=2048)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        with torch.no_grad():
            for layer in model.model.layers[2:]:
                layer.self_attn.o_proj.weight.mul_(0.05)
                layer.mlp.down_proj.weight.mul_(0.05)
        model.save_pretrained(target)
    if not (out / "draft" / "config.json").exists():
        _first_layers(target, out / "draft", 2)
    cut = out / "smollm2-first-8-layers"
    if not (cut / "config.json").exists():
        _first_layers(dequantized_folder(default_model_path()), cut, 8)
    for folder in (target, out / "draft", cut):
        print(folder)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
