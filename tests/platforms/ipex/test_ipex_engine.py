"""The ipex platform end to end on tiny random models: greedy tokens equal to
transformers' (fp32) through a mixed batch with chunked prefill, prefix-cache
hits and preemption, with the layers this CPU gets and with every IPEX layer
forced; the e5m2 cache against transformers with the same rounding; two
tensor-parallel ranks."""

from __future__ import annotations

import random

import pytest
import torch
from parity import Fp8KVRounding, check_top5, hf_greedy
from transformers import AutoModelForCausalLM

from pllm import LLM, SamplingParams
from pllm.loader.testing import make_tiny_model
from pllm.loader.transformers_compat import dtype_kwargs
from pllm.platforms.ipex.layers import LAYERS_ENV

MAX_NEW = 20


def _prompts() -> list[list[int]]:
    """Uneven lengths (a 45-token prompt takes several 16-token chunks), and
    two prompts that share a 32-token prefix with the first (prefix hits)."""
    rng = random.Random(0)
    first = [rng.randrange(3, 300) for _ in range(45)]
    return [first, [7, 8, 9], first[:32] + [11, 12, 13], [rng.randrange(3, 300) for _ in range(17)],
            first[:32] + [21] * 5, [5]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ipex-models")
    return {
        "llama": make_tiny_model(root / "llama", arch="llama"),
        "mistral": make_tiny_model(root / "mistral", arch="mistral", sliding_window=12),
        "qwen3": make_tiny_model(root / "qwen3", arch="qwen3"),
    }


def _greedy(llm: LLM, prompts, max_new: int = MAX_NEW, **extra):
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, **extra)
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("layers", ["chosen", "all"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_greedy_matches_transformers_with_chunks_prefix_hits_and_preemption(
        models, arch, layers, monkeypatch):
    if layers == "all":
        monkeypatch.setenv(LAYERS_ENV, "all")
    else:
        monkeypatch.delenv(LAYERS_ENV, raising=False)
    prompts = _prompts()
    want = hf_greedy(models[arch], prompts, MAX_NEW)
    # 9 blocks of 16 tokens cannot hold six growing sequences at once: some are preempted.
    llm = LLM(models[arch], device="ipex", dtype="float32", max_model_len=128,
              max_num_batched_tokens=16, num_blocks_override=9)
    try:
        got = [o.outputs[0].token_ids for o in _greedy(llm, prompts)]
        stats = llm.llm_engine.get_stats()
    finally:
        llm.shutdown()
    assert got == want
    assert stats.prefix_cache_hits > 0, stats
    assert stats.num_preemptions > 0, stats
    assert stats.num_free_blocks == stats.num_total_blocks, f"blocks leaked: {stats}"


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


# Seen on a 2-core AVX-512 VNNI Xeon: IPEX 2.8's flash_attn_varlen_func over
# this e5m2 cache ends the process with a segmentation fault (the same at the
# commit before the GGUF work); it passed on AVX2 hosts.
@pytest.mark.skipif(_has_avx512(), reason="IPEX 2.8's varlen attention over an e5m2 cache "
                    "segfaults on AVX-512 hosts (an IPEX crash, not isolated yet)")
def test_e5m2_cache_matches_transformers_with_the_same_rounding(models):
    """K (after rotary) and V rounded to e5m2 with the scales, in transformers
    too: the same greedy tokens, top-5 logprobs within 1e-4."""
    folder = models["llama"]
    hf = AutoModelForCausalLM.from_pretrained(folder, **dtype_kwargs(torch.float32)).eval()
    prompts = _prompts()
    with Fp8KVRounding(hf, torch.float8_e5m2), torch.inference_mode():
        want = hf_greedy(hf, prompts, MAX_NEW)
        ref = [hf(torch.tensor([p + e])).logits[0, len(p) - 1: -1].float().log_softmax(-1)
               for p, e in zip(prompts, want)]
    llm = LLM(folder, device="ipex", dtype="float32", kv_cache_dtype="fp8_e5m2",
              kv_cache_memory="16MiB", max_num_batched_tokens=16)
    try:
        outs = _greedy(llm, prompts, logprobs=5)
    finally:
        llm.shutdown()
    check_top5(outs, want, ref)


def test_e4m3_cache_is_refused_naming_what_ipex_stores(models):
    with pytest.raises(ValueError, match="float8_e5m2"):
        LLM(models["llama"], device="ipex", dtype="float32", kv_cache_dtype="fp8_e4m3",
            kv_cache_memory="16MiB")


def test_two_tensor_parallel_ranks_match_transformers(models):
    """Two processes on IPEX, gloo with the shared-memory all-reduce."""
    folder = models["qwen3"]
    prompts = _prompts()
    want = hf_greedy(folder, prompts, MAX_NEW)
    llm = LLM(folder, device="ipex", dtype="float32", kv_cache_memory="16MiB",
              tensor_parallel_size=2, max_num_batched_tokens=16)
    try:
        got = [o.outputs[0].token_ids for o in _greedy(llm, prompts)]
        stats = llm.llm_engine.get_stats()
    finally:
        llm.shutdown()
    assert got == want
    assert stats.num_free_blocks == stats.num_total_blocks, stats
