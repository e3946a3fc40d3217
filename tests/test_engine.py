"""Engine start-up and the step API."""

from __future__ import annotations

import dataclasses

import pytest

from pllm import SamplingParams
from pllm.core.engine import LLMEngine
from pllm.core.executor import Worker
from pllm.entrypoints.engine_args import EngineArgs
from pllm.platforms.cpu.platform import CPUPlatform


def test_profiling_platforms_run_a_forward_pass_before_sizing(tiny_model_dir, monkeypatch):
    caps = dataclasses.replace(CPUPlatform().capabilities, profiles_memory=True)
    monkeypatch.setattr(CPUPlatform, "capabilities", property(lambda self: caps))
    calls = []
    original = Worker.profile_run
    monkeypatch.setattr(Worker, "profile_run", lambda self: (calls.append(1), original(self))[1])
    config = EngineArgs(model=tiny_model_dir, kv_cache_memory="4MB", max_num_batched_tokens=64,
                        max_model_len=128).create_engine_config()
    engine = LLMEngine(config, platform=CPUPlatform())
    assert calls == [1]
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


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


def test_unsupported_block_size_names_the_choices(tiny_model_dir):
    with pytest.raises(ValueError, match="block_size=2048"):
        LLMEngine(EngineArgs(model=tiny_model_dir, block_size=2048, kv_cache_memory="4MB",
                             device="cpu").create_engine_config())
