"""Engine start-up, the step API, and what the core does with each
capability and hook of the platform contract, on the fake platform (no
compiled kernels, a cache layout of its own)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.core.engine import LLMEngine
from pllm.core.worker import Worker
from pllm.entrypoints.engine_args import EngineArgs
from pllm.loader.testing import make_tiny_model


def _platform_with(fake_platform, **caps):
    """A fake platform instance whose capabilities differ by ``caps``."""
    changed = dataclasses.replace(fake_platform().capabilities, **caps)
    cls = type("Changed", (fake_platform,), {"capabilities": property(lambda self: changed)})
    return cls()


def _engine(model_dir, platform, **args) -> LLMEngine:
    args.setdefault("kv_cache_memory", "4MB")
    args.setdefault("max_model_len", 128)
    return LLMEngine(EngineArgs(model=model_dir, **args).create_engine_config(), platform=platform)


def _greedy(engine: LLMEngine, prompts, max_tokens: int = 6) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0].token_ids
    return [done[i] for i in range(len(prompts))]


PROMPTS = [[5, 6, 7], list(range(10, 40)), [9] * 17]


def test_profiling_platforms_run_a_forward_pass_before_sizing(tiny_model_dir, fake_platform,
                                                              monkeypatch):
    calls = []
    original = Worker.profile_run
    monkeypatch.setattr(Worker, "profile_run", lambda self: (calls.append(1), original(self))[1])
    engine = _engine(tiny_model_dir, _platform_with(fake_platform, profiles_memory=True),
                     max_num_batched_tokens=64)
    assert calls == [1]
    assert len(_greedy(engine, [[5, 6, 7]], 3)[0]) == 3
    _engine(tiny_model_dir, fake_platform())
    assert calls == [1]  # only platforms that ask for it


def test_step_api_streams_cumulative_outputs(tiny_llm):
    engine = tiny_llm.llm_engine
    engine.add_request("s", [9, 8, 7, 6], SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    seen = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(list(out.outputs[0].token_ids))
    assert [len(s) for s in seen] == [1, 2, 3, 4, 5]
    assert all(seen[i] == seen[-1][: i + 1] for i in range(5))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [1, 2], SamplingParams())
        engine.add_request("dup", [1, 2], SamplingParams())
    engine.abort_request("dup")


def test_the_config_is_resolved_once_from_the_platform(tiny_model_dir, fake_platform):
    """dtype, block size, max_model_len and the cache dtype are decided at
    start-up from the capabilities and the model, and read from the config."""
    engine = _engine(tiny_model_dir, _platform_with(fake_platform, default_block_size=8),
                     max_model_len=None)
    config = engine.config
    assert config.resolved and config.model.dtype == "float32" and config.cache.block_size == 8
    assert config.cache.cache_dtype == "float32"
    assert config.model.max_model_len == engine.max_model_len == 256  # the tiny model's context
    assert engine.kv.block_size == 8
    assert engine.executor.worker.runner.block_size == 8


def test_unsupported_block_size_names_the_choices(tiny_model_dir, fake_platform):
    with pytest.raises(ValueError, match=r"block_size=2048 is not supported on fakeaccel; "
                                         r"supported: 8, 16, 32"):
        _engine(tiny_model_dir, fake_platform(), block_size=2048)


def test_a_sliding_window_model_is_refused_where_attention_has_none(tmp_path, fake_platform):
    mistral = make_tiny_model(tmp_path / "mistral", arch="mistral", sliding_window=16)
    with pytest.raises(ValueError, match=r"sliding window of 16 tokens.*fakeaccel"):
        _engine(mistral, _platform_with(fake_platform, supports_sliding_window=False))
    assert _engine(mistral, fake_platform()).config.resolved  # where it has one, it runs


def test_attention_soft_capping_is_refused_where_attention_has_none(tmp_path, fake_platform):
    """Gemma 2 soft-caps its attention logits: a platform that does not
    declare ``supports_soft_cap`` (the default, as this plugin) refuses it by
    name rather than attending without the cap. A model without a cap never
    passes ``soft_cap`` (this plugin's backend does not take it)."""
    gemma2 = make_tiny_model(tmp_path / "gemma2", arch="gemma2", attn_logit_softcapping=50.0)
    assert not fake_platform().capabilities.supports_soft_cap
    with pytest.raises(ValueError, match=r"gemma2 model soft-caps its attention logits \(at 50.0\)"
                                         r", which fakeaccel attention does not support"):
        _engine(gemma2, fake_platform())
    no_cap = make_tiny_model(tmp_path / "gemma2_no_cap", arch="gemma2",
                             attn_logit_softcapping=None)
    engine = _engine(no_cap, fake_platform())
    assert len(_greedy(engine, [[5, 6, 7, 8]])[0]) == 6


def test_experts_are_refused_where_shapes_are_static(tmp_path, fake_platform):
    """An MoE model's per-expert shapes depend on the routing: a static-shape
    (XLA) platform cannot compile them, so it is refused there by name."""
    mixtral = make_tiny_model(tmp_path / "mixtral", arch="mixtral")
    with pytest.raises(ValueError, match=r"mixtral model routes tokens to experts.*fakeaccel"):
        _engine(mixtral, _platform_with(fake_platform, token_buckets=(8, 16), seq_buckets=(2,)))
    assert _engine(mixtral, fake_platform()).config.resolved  # dynamic shapes: it runs


def test_a_head_dim_the_platform_lacks_is_refused(tiny_model_dir, fake_platform):
    with pytest.raises(ValueError, match=r"head_dim=16 is not supported on fakeaccel"):
        _engine(tiny_model_dir, _platform_with(fake_platform, head_dims=(64, 128)))


def test_static_shapes_pad_every_step_and_change_no_token(tiny_model_dir, fake_platform,
                                                          monkeypatch):
    """A platform with token and sequence buckets sees only bucket-sized
    steps (and full-width block tables); the tokens are the unpadded engine's."""
    want = _greedy(_engine(tiny_model_dir, fake_platform()), PROMPTS)
    platform = _platform_with(fake_platform, token_buckets=(8, 16, 64), seq_buckets=(2, 4))
    shapes = set()
    backend_cls = type(platform.make_attention_backend())
    original = backend_cls.forward

    def watched(self, query, kv_cache, metadata, **kwargs):
        shapes.add((metadata.num_tokens, metadata.num_seqs, metadata.block_tables.shape[1]))
        return original(self, query, kv_cache, metadata, **kwargs)

    monkeypatch.setattr(backend_cls, "forward", watched)
    assert _greedy(_engine(tiny_model_dir, platform, max_num_batched_tokens=64), PROMPTS) == want
    # Sequences: always the bucket of max_num_seqs (clamped to the largest, 4).
    assert shapes and all(t in (8, 16, 64) and s == 4 and w == 8 for t, s, w in shapes), shapes


def test_static_shapes_compile_every_shape_at_start_up(tiny_model_dir, fake_platform):
    """The warm-up runs a forward pass per token bucket up to the step
    budget, with a graph break after each program, before any request."""
    breaks = []
    platform = _platform_with(fake_platform, token_buckets=(8, 16, 64, 128), seq_buckets=(2, 4))
    type(platform).graph_break = lambda self: breaks.append(1)
    backend_cls = type(platform.make_attention_backend())
    seen = []
    original = backend_cls.forward

    def watched(self, query, kv_cache, metadata, **kwargs):
        seen.append(metadata.num_tokens)
        return original(self, query, kv_cache, metadata, **kwargs)

    backend_cls.forward = watched
    try:
        _engine(tiny_model_dir, platform, max_num_batched_tokens=64)
    finally:
        backend_cls.forward = original
    assert sorted(set(seen)) == [8, 16, 64]  # not 128: past the step budget
    assert len(breaks) >= 3 + 3 * 2  # a forward and its LM heads per token bucket


def test_without_inference_mode_the_runner_uses_no_grad(tiny_model_dir, fake_platform):
    """Capability ``inference_mode`` False (XLA's tensors cannot be inference
    tensors): steps run under no_grad, even inside an inference-mode caller."""
    want = _greedy(_engine(tiny_model_dir, fake_platform()), PROMPTS)
    platform = _platform_with(fake_platform, inference_mode=False)
    backend_cls = type(platform.make_attention_backend())
    modes = set()
    original = backend_cls.forward

    def watched(self, query, kv_cache, metadata, **kwargs):
        modes.add((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return original(self, query, kv_cache, metadata, **kwargs)

    backend_cls.forward = watched
    try:
        engine = _engine(tiny_model_dir, platform)
        with torch.inference_mode():  # as the server's engine thread runs its steps
            got = _greedy(engine, PROMPTS)
    finally:
        backend_cls.forward = original
    assert got == want and modes == {(False, False)}


def test_the_decode_runner_is_asked_only_where_graphs_are_supported(tiny_model_dir, fake_platform):
    asked = []

    class WithRunner(fake_platform):
        name = "graphaccel"  # not the fake's name: its config hook would force enforce_eager

        def make_decode_runner(self, model, backend, kv_caches, config):
            asked.append(config.model.max_model_len)
            return None

    _engine(tiny_model_dir, WithRunner())
    assert asked == []
    graphs = dataclasses.replace(WithRunner().capabilities, supports_graphs=True)
    WithRunner.capabilities = property(lambda self: graphs)
    _engine(tiny_model_dir, WithRunner())
    assert asked == [128]
    _engine(tiny_model_dir, WithRunner(), enforce_eager=True)
    assert asked == [128]


def test_num_blocks_override_is_applied_by_the_core(tiny_model_dir, fake_platform, monkeypatch):
    from pllm_fakeaccel.allocator import FakeAccelAllocator

    def never(self, *args):
        raise AssertionError("the allocator was asked despite num_blocks_override")

    monkeypatch.setattr(FakeAccelAllocator, "num_blocks", never)
    engine = _engine(tiny_model_dir, fake_platform(), num_blocks_override=9, max_model_len=64)
    assert engine.kv.num_total_blocks == 9
    assert engine.executor.worker.runner.kv_caches[0].shape[0] == 9  # the fake's layout: blocks first


def test_setup_and_teardown_process_hooks(tiny_model_dir, fake_platform):
    calls = []

    class Hooked(fake_platform):
        def setup_process(self, config, rank):
            calls.append(("setup", rank, config.resolved))

        def teardown_process(self):
            calls.append(("teardown",))

    engine = _engine(tiny_model_dir, Hooked())
    engine.shutdown()
    assert calls == [("setup", 0, True), ("teardown",)]


def test_memory_utilization_and_its_vllm_alias():
    from pllm.core.config import CacheConfig

    assert EngineArgs(gpu_memory_utilization=0.5).create_engine_config().cache.memory_utilization == 0.5
    assert EngineArgs(memory_utilization=0.7).create_engine_config().cache.memory_utilization == 0.7
    assert CacheConfig().memory_utilization is None  # the platform's default
    with pytest.raises(ValueError, match="not both"):
        CacheConfig(memory_utilization=0.5, gpu_memory_utilization=0.6)


def test_tensor_parallel_on_the_fake_platform_closes_its_group(tiny_model_dir, fake_platform,
                                                               tiny_llm):
    """Two ranks on a plugin that has only the contract (gloo through the
    shared communicator): the tokens of one rank, and a second engine in the
    same process after the first shut down, which only works if the core
    closed the first one's communicators."""
    want = [o.outputs[0].token_ids for o in tiny_llm.generate(
        PROMPTS, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)]
    for _ in range(2):
        llm = LLM(tiny_model_dir, device="fakeaccel", kv_cache_memory="16MB", max_model_len=128,
                  tensor_parallel_size=2)
        try:
            outs = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0,
                                                        ignore_eos=True), use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == want
        finally:
            llm.shutdown()
        assert not torch.distributed.is_initialized()
