"""Greedy parity with transformers on the real SmolLM2-135M-Instruct weights
through the XLA device (``--device tpu`` under PLLM_XLA_EMULATE=cpu): one
engine (its warm-up compiles each step shape once) serving a mixed batch in
32-token chunks, with prefix-cache hits and preemption."""

from __future__ import annotations

import pytest
from parity import check_setting, hf_greedy, smollm2_hf_and_prompts

from pllm import LLM

MAX_NEW = 16
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon were",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def reference():
    hf, prompts = smollm2_hf_and_prompts(PROMPTS)
    return prompts, hf_greedy(hf, prompts, MAX_NEW)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["tpu", "neuron"])
def test_smollm2_greedy_parity_on_the_xla_device(reference, device):
    prompts, expected = reference
    longest = max(len(p) for p in prompts) + MAX_NEW
    blocks = -(-longest // 16)
    # Room for two sequences at a time (preemption); 32-token steps (chunked prefill).
    llm = LLM(None, device=device, dtype="float32", max_model_len=blocks * 16,
              num_blocks_override=2 * blocks + 1, max_num_batched_tokens=32, max_num_seqs=4)
    try:
        check_setting(llm, prompts, expected, MAX_NEW, "preemptions")
        check_setting(llm, prompts, expected, MAX_NEW, "prefix_hits")
    finally:
        llm.shutdown()
