"""Tensor parallelism on the CPU: two ranks, two processes, gloo all-reduces.

Greedy tokens must equal transformers' on the same weights, with the step's
inputs (chunked prefills, prefix-cache hits, copy-on-write forks) reaching
the second rank; KV heads replicated when there are fewer than ranks; a model
that does not split evenly fails before any process starts."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import random
import signal
from dataclasses import replace

import pytest
import torch
from parity import check_top5, hf_greedy
from transformers import AutoModelForCausalLM, LlamaConfig

from pllm import LLM, SamplingParams
from pllm.core.config import EngineConfig, ParallelConfig
from pllm.core.executor.multiproc import _worker_main, check_tensor_parallel
from pllm.core.interfaces import PlatformCapabilities
from pllm.loader import load_model
from pllm.loader.testing import make_tiny_model
from pllm.models.llama import ArchSpec
from pllm.models.parallel import TensorParallel
from pllm.platforms.cpu.platform import CPUPlatform

MAX_NEW = 20
PROMPT_LENS = [5, 17, 40, 3]
# Every bias non-zero: the row-parallel ones (o_proj, down_proj) must be added
# once over the ranks, the column-parallel ones split with their heads.
ARCHS = {
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    # Tied embeddings, and a vocabulary that does not split evenly over two
    # ranks: the LM head's slices are 161 and 160 rows of the embedding.
    "qwen3_tied": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=321,
                                 tie_word_embeddings=True)),
    # One KV head (MQA) on two ranks: both hold it, with its bias (Qwen2's
    # q/k/v carry biases).
    "qwen2_mqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1)),
    # Q/K/V and gate/up fused in the checkpoint: taken apart, then each
    # rank's heads and columns fused again; a quarter of each head unrotated.
    # Experts split by their intermediate dimension, a shared expert, one
    # dense layer (and Qwen2's Q/K/V biases).
    "qwen2_moe": ("qwen2_moe", dict(mlp_only_layers=[1])),
    # Gemma 3: its four norms, q/k norms, a sliding and a global layer, tied
    # embeddings split by vocabulary.
    "gemma3": ("gemma3_text", dict(tie_word_embeddings=True)),
    # Gemma 2: soft-capped attention logits on each rank's heads (weights
    # drawn wide enough for the cap to bend the scores).
    "gemma2": ("gemma2", dict(tie_word_embeddings=True, attn_logit_softcapping=0.5,
                              initializer_range=0.2)),
    "phi3_partial": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.75})),
}
BIASED = ("llama_biases", "qwen2_mqa", "qwen2_moe")


def _random_biases(folder: str) -> None:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    hf.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(ARCHS))
def tp_engine(request, tmp_path_factory):
    arch, overrides = ARCHS[request.param]
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), arch=arch, **overrides)
    if request.param in BIASED:
        _random_biases(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in PROMPT_LENS]
    expected = hf_greedy(hf, prompts, MAX_NEW)
    with torch.inference_mode():  # transformers' log-softmax at each generated position
        hf_logprobs = [hf(torch.tensor([p + e])).logits[0, len(p) - 1: -1].float().log_softmax(-1)
                       for p, e in zip(prompts, expected)]
    # A 16-token budget chunks every prompt over 16 tokens.
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB", tensor_parallel_size=2,
              max_num_batched_tokens=16)
    yield llm, prompts, expected, hf_logprobs
    llm.shutdown()


def test_two_ranks_match_transformers(tp_engine):
    """Tokens and the top-5 logprobs at every step (tiny random models repeat
    themselves; the logprobs would show a bias added twice or a lost shard)."""
    llm, prompts, expected, hf_logprobs = tp_engine
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    for round_ in range(2):  # the second round starts from prefix-cache hits
        outs = llm.generate(prompts, params, use_tqdm=False)
        for i, (out, exp, ref) in enumerate(zip(outs, expected, hf_logprobs)):
            where = f"round {round_}, prompt {i} (len {len(prompts[i])})"
            assert out.outputs[0].token_ids == exp, where
            for step, top in enumerate(out.outputs[0].logprobs):
                ids = sorted(top, key=lambda t: top[t].logprob, reverse=True)[:5]
                ref_vals, ref_ids = ref[step].topk(5)
                assert ids == ref_ids.tolist(), f"{where}, step {step}"
                got = torch.tensor([top[t].logprob for t in ids])
                torch.testing.assert_close(got, ref_vals, atol=1e-4, rtol=0, msg=f"{where}, step {step}")
    stats = llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits > 0, stats
    assert stats.num_free_blocks == stats.num_total_blocks, stats


def test_speculation_under_two_ranks_matches_transformers(tp_engine):
    """n-gram drafts verified on rank 0 from both ranks' logits: the same
    tokens, and each emitted token's top-5 logprobs those of its position."""
    from pllm.core.config import SpeculativeConfig
    from pllm.core.spec_decode import NgramProposer

    llm, prompts, expected, hf_logprobs = tp_engine
    sched = llm.llm_engine.scheduler
    sched.proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=1,
                                                     prompt_lookup_max=2))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        sched.proposer = None
    check_top5(outs, expected, hf_logprobs)
    assert sched.spec_stats.num_accepted_tokens > 0, sched.spec_stats
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, stats


def test_forked_sequences_copy_blocks_on_every_rank(tp_engine):
    llm, prompts, expected, _ = tp_engine
    # n=2 shares the prompt's last, partly filled block: the fork copies it,
    # and the copy must happen on rank 1's cache too or its K/V go wrong.
    params = SamplingParams(n=2, temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    (out,) = llm.generate([prompts[1]], params, use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [expected[1], expected[1]]


def test_uneven_split_fails_before_any_process_starts(tiny_model_dir):
    loaded = load_model(tiny_model_dir)  # 4 query heads, 2 KV heads
    config = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=3))
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        check_tensor_parallel(config, CPUPlatform(), loaded.hf_config)
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible"):
        LLM(tiny_model_dir, device="cpu", kv_cache_memory="4MB", tensor_parallel_size=3)


@pytest.mark.parametrize("heads, kv_heads, size", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (8, 2, 8),
                                                    (9, 3, 9), (12, 4, 4)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(heads, kv_heads, size):
    group = heads // kv_heads
    for rank in range(size):
        q_lo, q_hi = rank * heads // size, (rank + 1) * heads // size
        read = sorted({h // group for h in range(q_lo, q_hi)})
        lo, hi = TensorParallel(rank, size, comm=object()).kv_head_range(kv_heads)
        assert list(range(lo, hi)) == read, f"rank {rank}"


def test_kv_heads_that_cannot_be_replicated_evenly_are_refused():
    cfg = LlamaConfig(hidden_size=96, num_attention_heads=12, num_key_value_heads=3,
                      intermediate_size=96, num_hidden_layers=1, vocab_size=64)
    assert ArchSpec(cfg, 6).num_kv_heads == 1  # 3 heads on 6 ranks: each held twice
    with pytest.raises(ValueError, match=r"key/value heads \(3\) is below tensor_parallel_size "
                                         r"\(4\) and does not divide it"):
        check_tensor_parallel(EngineConfig(parallel=ParallelConfig(tensor_parallel_size=4)),
                              CPUPlatform(), cfg)


class _OneGPUPlatform(CPUPlatform):
    """A platform whose ranks each need a device of their own, with one device."""

    @property
    def capabilities(self) -> PlatformCapabilities:
        return replace(super().capabilities, ranks_share_device=False)


def test_more_ranks_than_devices_is_refused(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    config = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs 2 cpu devices; 1 visible"):
        check_tensor_parallel(config, _OneGPUPlatform(), loaded.hf_config)


class _NoFabricPlatform(CPUPlatform):
    def make_communicator(self, rank, world_size, init_method):
        raise RuntimeError("no fabric between the ranks")


def test_a_failing_rank_reports_its_traceback():
    """What rank 0 receives from a rank that fails (here, run in this process)."""
    parent, child = mp.Pipe()
    config = EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2))
    sigint = signal.getsignal(signal.SIGINT)  # the rank ignores Ctrl-C; give it back to pytest
    try:
        with pytest.raises(SystemExit):
            _worker_main(1, config, _NoFabricPlatform, "unused", "tcp://127.0.0.1:1", child)
    finally:
        signal.signal(signal.SIGINT, sigint)
    kind, text = pickle.loads(parent.recv_bytes())
    assert kind == "error"
    assert "no fabric between the ranks" in text and "Traceback" in text


def test_decode_steps_use_the_compiled_halves(tp_engine, monkeypatch):
    """Rank 0's decode steps run each layer as two compiled calls with an
    all-reduce after each (not the modules one by one), with the same tokens."""
    import pllm.platforms.cpu.layers as cpu_layers

    llm, prompts, expected, _ = tp_engine
    if llm.llm_engine.executor.worker.model.layers[0].dense_weights() is None:
        pytest.skip("q/k norms, partial rotary or experts run module by module: the compiled layer "
                    "does not apply")
    ops, calls = cpu_layers.cpu_ops(), []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ops, name)
            if name != "decode_layer_attn":
                return fn
            return lambda *args: calls.append(1) or fn(*args)

    monkeypatch.setattr(cpu_layers, "cpu_ops", Counting)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    (out,) = llm.generate([prompts[0]], params, use_tqdm=False)
    assert out.outputs[0].token_ids == expected[0]
    num_layers = llm.llm_engine.executor.worker.model.num_layers
    assert len(calls) == (MAX_NEW - 1) * num_layers
