"""Greedy parity with transformers on the real SmolLM2-135M-Instruct weights
(the default model), in every engine setting."""

from __future__ import annotations

import os

import pytest
import torch

from parity import check_setting, hf_greedy, settings
from pllm import LLM
from pllm.loader import default_model_path

pytestmark = pytest.mark.slow

MAX_NEW = 32
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colors:",
    "The quick brown fox",
    "In 1969, the first humans to walk on the Moon were",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: I like apples.",
]
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant named SmolLM, trained by Hugging Face. "
          "Answer briefly and politely.<|im_end|>\n")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # Half the prompts share a long system prompt, so the prefix cache has something to hit.
    texts = [SYSTEM + p if i % 2 else p for i, p in enumerate(PROMPTS)]
    prompts = [tok.encode(t) for t in texts]
    return prompts, hf_greedy(hf, prompts, MAX_NEW)


def test_reference_says_paris(reference):
    prompts, expected = reference
    from pllm.loader import load_model

    text = load_model().tokenizer.decode(expected[0])
    assert text.startswith(" Paris"), text


@pytest.mark.parametrize("setting", settings([40, 60], MAX_NEW), ids=lambda s: s[0])
def test_greedy_parity_smollm2(reference, setting):
    prompts, expected = reference
    _, kwargs, must = setting
    if must == "preemptions":
        longest = max(len(p) for p in prompts) + MAX_NEW
        blocks = -(-longest // 16)
        kwargs = dict(num_blocks_override=2 * blocks + 1, max_model_len=blocks * 16)
    llm = LLM(None, device="cpu", kv_cache_memory="64MB", **kwargs)
    check_setting(llm, prompts, expected, MAX_NEW, must)


def test_greedy_parity_smollm2_three_tensor_parallel_ranks(reference):
    """SmolLM2's 9 query and 3 KV heads split over three processes (gloo)."""
    prompts, expected = reference
    llm = LLM(None, device="cpu", kv_cache_memory="64MB", tensor_parallel_size=3)
    try:
        check_setting(llm, prompts, expected, MAX_NEW, None)
    finally:
        llm.shutdown()
