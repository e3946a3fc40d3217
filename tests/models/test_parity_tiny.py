"""Greedy parity with transformers on tiny random models of every supported
architecture, in every engine setting (batching, chunked prefill, prefix-cache
hits, preemption)."""

from __future__ import annotations

import random

import pytest
import torch
from parity import check_setting, check_top5, hf_greedy, settings
from transformers import AutoModelForCausalLM

from pllm import LLM, SamplingParams
from pllm.loader.testing import make_tiny_model

MAX_NEW = 24
PROMPT_LENS = [5, 16, 17, 33, 48, 3]
ARCHS = {
    "llama": dict(),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(sliding_window=12),  # shorter than most prompts
    "qwen2": dict(),
    "qwen3": dict(),
    "mqa": dict(num_key_value_heads=1),
    "phi3": dict(),  # q/k/v and gate/up fused in the checkpoint
    # Phi-4-mini's shape: a quarter of each head unrotated, LongRoPE factors
    # (the prompts stay within the original context: the short ones).
    "phi3_longrope_partial": dict(
        original_max_position_embeddings=128,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75,
                         "short_factor": [1.0, 1.3, 1.9, 2.4, 3.1, 4.0],
                         "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 5.0]}),
    "phi3_window": dict(sliding_window=12),
    # Mixture of experts: four experts, two per token.
    "mixtral": dict(),
    "qwen2_moe": dict(mlp_only_layers=[1]),  # a shared expert; the second layer dense
    "qwen3_moe": dict(),  # top-k weights renormalised, q/k norms
    # Gemma 3: a sliding layer (base 10k) and a global one (base 1M, linear
    # scaling 8), query_pre_attn_scalar 256 (not head_dim), tied embeddings.
    "gemma3_text": dict(tie_word_embeddings=True, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}),
    # Gemma 3 configs may set Gemma 2's final logit soft-cap too.
    "gemma3_softcap": dict(final_logit_softcapping=3.0),
    # Gemma 2: alternating local (window 12, shorter than most prompts) and
    # global layers, attention logits soft-capped at 0.5 and final logits at
    # 3; weights drawn 10x wider than the default, so that the scores are
    # large enough for the cap to bend them (without the cap the top-5
    # logprobs differ; the greedy tokens happen not to).
    "gemma2": dict(sliding_window=12, attn_logit_softcapping=0.5, final_logit_softcapping=3.0,
                   tie_word_embeddings=True, initializer_range=0.2),
}
BASE_ARCH = {"llama3_rope": "llama", "mqa": "llama", "phi3_longrope_partial": "phi3",
             "phi3_window": "phi3", "gemma3_softcap": "gemma3_text"}


def _prompts(vocab: int = 300) -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, vocab) for _ in range(32)]  # two full blocks, shared by all
    return [shared[: min(n, 32)] + [rng.randrange(3, vocab) for _ in range(max(n - 32, 0))]
            if n >= 32 else [rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    name = request.param
    arch = BASE_ARCH.get(name, name)
    folder = make_tiny_model(tmp_path_factory.mktemp(name), arch=arch, **ARCHS[name])
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = _prompts()
    expected = hf_greedy(hf, prompts, MAX_NEW)
    with torch.inference_mode():  # transformers' log-softmax at each generated position
        logprobs = [hf(torch.tensor([p + e])).logits[0, len(p) - 1: -1].float().log_softmax(-1)
                    for p, e in zip(prompts, expected)]
    return folder, prompts, expected, logprobs


@pytest.mark.parametrize("setting", settings(PROMPT_LENS, MAX_NEW), ids=lambda s: s[0])
def test_greedy_parity(tiny, setting):
    folder, prompts, expected, _ = tiny
    _, kwargs, must = setting
    kwargs = {"kv_cache_memory": "16MB", **kwargs}
    llm = LLM(folder, device="cpu", **kwargs)
    check_setting(llm, prompts, expected, MAX_NEW, must)


def test_top5_logprobs_in_a_mixed_batch(tiny):
    """All prompts in one batch, chunked by a 16-token budget: each emitted
    token's top-5 logprobs are transformers' at its position."""
    folder, prompts, expected, logprobs = tiny
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB", max_num_batched_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    check_top5(llm.generate(prompts, params, use_tqdm=False), expected, logprobs)
