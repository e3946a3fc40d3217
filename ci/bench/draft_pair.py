"""A target and draft pair for measuring draft-model speculation's mechanics
(there is no published draft for SmolLM2-135M): a random Llama of SmolLM2's
size whose layers after the first two are scaled down to add little to the
residual stream, and as its draft those first two layers with the same
embedding, norm and LM head. The draft costs about a sixth of the target
per token and agrees with it often, not always.

    python ci/bench/draft_pair.py OUT_DIR   # writes OUT_DIR/target, OUT_DIR/draft
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pllm.loader.testing import make_tiny_model


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
    draft = out / "draft"
    if not (draft / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        model.save_pretrained(draft)
        AutoTokenizer.from_pretrained(target).save_pretrained(draft)
    print(target)
    print(draft)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
