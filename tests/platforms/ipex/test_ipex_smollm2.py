"""The default model (SmolLM2-135M-Instruct) on the ipex platform: greedy
tokens equal to transformers' in fp32 in every engine setting and on two
tensor-parallel ranks; bf16 and the e5m2 cache are lossy, so there
transformers scores the tokens pllm picked (as the CPU's fp8 test does)."""

from __future__ import annotations

import pytest
from parity import (
    check_setting,
    hf_greedy,
    hf_scores,
    pllm_greedy,
    settings,
    smollm2_hf_and_prompts,
)

from pllm import LLM

pytestmark = pytest.mark.slow

MAX_NEW = 24
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon were",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_and_prompts():
    return smollm2_hf_and_prompts(PROMPTS)


@pytest.fixture(scope="module")
def reference(hf_and_prompts):
    hf, prompts = hf_and_prompts
    return prompts, hf_greedy(hf, prompts, MAX_NEW)


@pytest.mark.parametrize("setting", settings([40, 60], MAX_NEW), ids=lambda s: s[0])
def test_greedy_parity_in_fp32(reference, setting):
    prompts, expected = reference
    _, kwargs, must = setting
    if must == "preemptions":
        longest = max(len(p) for p in prompts) + MAX_NEW
        blocks = -(-longest // 16)
        kwargs = dict(num_blocks_override=2 * blocks + 1, max_model_len=blocks * 16)
    llm = LLM(None, device="ipex", dtype="float32", kv_cache_memory="64MB", **kwargs)
    try:
        check_setting(llm, prompts, expected, MAX_NEW, must)
    finally:
        llm.shutdown()


def test_greedy_parity_on_three_tensor_parallel_ranks(reference):
    """SmolLM2's 9 query and 3 KV heads over three processes."""
    prompts, expected = reference
    llm = LLM(None, device="ipex", dtype="float32", kv_cache_memory="64MB",
              tensor_parallel_size=3)
    try:
        check_setting(llm, prompts, expected, MAX_NEW, None)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("dtype,kv_cache_dtype", [("bfloat16", "auto"), ("float32", "fp8_e5m2")])
def test_lossy_settings_stay_close_to_transformers(hf_and_prompts, dtype, kv_cache_dtype):
    """Most tokens transformers' own greedy choice, the rest close behind (a
    broken path scores tens of nats)."""
    hf, prompts = hf_and_prompts
    llm = LLM(None, device="ipex", dtype=dtype, kv_cache_dtype=kv_cache_dtype,
              kv_cache_memory="64MB")
    try:
        got = pllm_greedy(llm, prompts, MAX_NEW)
        text = llm.get_tokenizer().decode(got[0])
    finally:
        llm.shutdown()
    agree, gaps = hf_scores(hf, prompts, got)
    mean_gap, worst = sum(gaps) / len(gaps), max(gaps)
    figures = f"{agree:.1%} greedy-equal, mean gap {mean_gap:.3f}, worst {worst:.2f} nats"
    # The ipex leg (run with -rP) puts this line into its summary.
    print(f"AGREEMENT {dtype}/{kv_cache_dtype}: {figures} of {len(prompts) * MAX_NEW} tokens")
    assert agree >= 0.8 and mean_gap < 0.1 and worst < 3.0, figures
    assert text.startswith(" Paris"), text
