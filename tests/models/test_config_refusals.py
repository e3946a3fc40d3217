"""Configs a model definition cannot run are refused by name, before
anything loads."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from pllm.models import describe_model

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128, vocab_size=320,
            layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("change,match", [
    (dict(hidden_activation="relu"), "hidden_activation='relu' is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention is not supported"),
])
def test_gemma3_refuses_what_it_cannot_run(change, match):
    cfg = AutoConfig.for_model("gemma3_text", **TINY, **change)
    with pytest.raises(ValueError, match=match):
        describe_model(cfg)


def test_an_unknown_family_names_the_known_ones():
    cfg = AutoConfig.for_model("gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: "):
        describe_model(cfg)
