"""Pipeline parallelism on the CPU (``--pipeline-parallel-size``), with the
mp executor: the layers split into stages, one process per rank, the
residual stream and the logits sent point-to-point over gloo.

Greedy tokens, their logprobs and the prompt logprobs must equal
transformers' on the same weights, with up to one batch in flight per stage
(never a request in two); with tensor parallelism inside each stage
(``-tp 2 -pp 2``, four ranks); a request aborted while its batch is in
flight frees its blocks and leaves the others' tokens alone; a stage that
dies stops the engine. Ray runs the same pipelines in
``test_pipeline_parallel_ray.py`` and across two nodes in
``test_ray_executor.py``."""

from __future__ import annotations

import dataclasses
import os
import random
import time

import pytest
import torch
from parity import hf_greedy
from transformers import AutoModelForCausalLM

from pllm import LLM, SamplingParams
from pllm.core.config import EngineConfig, ParallelConfig, SpeculativeConfig
from pllm.core.executor import ExecutorBrokenError
from pllm.core.pipeline import check_pipeline
from pllm.loader import load_model
from pllm.loader.testing import make_tiny_model
from pllm.models.parallel import PARTITION_ENV, PipelineStage, layer_partition
from pllm.platforms.cpu.platform import CPUPlatform

MAX_NEW = 12
PROMPT_LENS = [5, 17, 40, 3, 22, 9]


def expected_outputs(folder: str, prompts: list[list[int]]):
    """transformers' greedy tokens, and the log-softmax at every position of
    prompt and output."""
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = hf_greedy(hf, prompts, MAX_NEW)
    with torch.inference_mode():
        logprobs = [hf(torch.tensor([p + e])).logits[0].float().log_softmax(-1)
                    for p, e in zip(prompts, tokens)]
    return tokens, logprobs


def check_against(outs, prompts, tokens, logprobs) -> None:
    for i, (out, prompt, exp, ref) in enumerate(zip(outs, prompts, tokens, logprobs)):
        got = out.outputs[0]
        assert got.token_ids == exp, f"prompt {i}"
        for step, top in enumerate(got.logprobs):  # each emitted token's top-2
            for token, entry in top.items():
                want = ref[len(prompt) - 1 + step, token].item()
                assert abs(entry.logprob - want) < 1e-4, f"prompt {i}, step {step}"
        for pos, entry in enumerate((out.prompt_logprobs or [None])[1:], start=1):  # position pos's token
            token = prompt[pos]
            assert abs(entry[token].logprob - ref[pos - 1, token].item()) < 1e-4, \
                f"prompt {i}, position {pos}"


PARAMS = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=2,
                        prompt_logprobs=1)

def test_a_stage_that_dies_stops_the_engine(tiny_model_dir):
    """The last stage's process killed mid-generation: rank 0, waiting for
    its logits, gets the engine error within seconds, not the collective's
    timeout."""
    llm = LLM(tiny_model_dir, device="cpu", kv_cache_memory="8MB", max_model_len=128,
              pipeline_parallel_size=2)
    try:
        engine = llm.llm_engine
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True))
        for _ in range(4):
            engine.step()
        os.kill(engine.executor._procs[0].pid, 9)
        t0 = time.monotonic()
        with pytest.raises(ExecutorBrokenError, match="rank 1"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - t0 < 30
        assert engine.broken is not None
    finally:
        llm.shutdown()
    assert not torch.distributed.is_initialized()


# (arch, config overrides, tp, pp): four layers split 2 + 2 (or 1 + 2 + 1 on
# three stages); Gemma 3 passes its residual stream without a separate
# residual, with a sliding and a global layer on different stages.
SHAPES = {
    "llama_pp2": ("llama", dict(num_hidden_layers=4), 1, 2),
    "llama_tied_pp3": ("llama", dict(num_hidden_layers=4, tie_word_embeddings=True), 1, 3),
    "qwen2_tp2_pp2": ("qwen2", dict(num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2), 2, 2),
    "gemma3_pp2": ("gemma3_text", dict(tie_word_embeddings=True), 1, 2),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def pipeline(request, tmp_path_factory):
    arch, overrides, tp, pp = SHAPES[request.param]
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), arch=arch, **overrides)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in PROMPT_LENS]
    tokens, logprobs = expected_outputs(folder, prompts)
    # A 16-token budget chunks every prompt over 16 tokens; 4 sequences a
    # step leave work for a second batch while the first is in flight.
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB", tensor_parallel_size=tp,
              pipeline_parallel_size=pp, max_num_batched_tokens=16, max_num_seqs=4)
    yield llm, prompts, tokens, logprobs, pp
    llm.shutdown()


def test_stages_match_transformers_with_batches_in_flight(pipeline):
    llm, prompts, tokens, logprobs, pp = pipeline
    engine = llm.llm_engine
    engine.max_in_flight = 0
    starts: list[set[str]] = []
    submit = engine.executor.submit

    def recording(sched):
        ids = {item.seq.request.request_id for item in sched.scheduled}
        in_flight = set().union(*(
            {item.seq.request.request_id for item in s.scheduled} for s, _, _ in engine.in_flight))
        assert not ids & in_flight, "a request in two batches at once"
        starts.append(ids)
        return submit(sched)

    engine.executor.submit = recording
    try:
        # The second round starts from prefix-cache hits (prompt logprobs
        # would compute every prompt position again).
        for params in (PARAMS, dataclasses.replace(PARAMS, prompt_logprobs=None)):
            check_against(llm.generate(prompts, params, use_tqdm=False), prompts, tokens,
                          logprobs)
    finally:
        del engine.executor.submit
    assert engine.max_in_flight == min(pp, 2 * len(PROMPT_LENS)), engine.max_in_flight
    assert len(starts) > 2 * MAX_NEW
    stats = engine.get_stats()
    assert stats.prefix_cache_hits > 0, stats
    assert stats.num_free_blocks == stats.num_total_blocks, stats
    assert not engine.in_flight and not engine.scheduler.in_flight


def test_a_request_aborted_in_flight_frees_its_blocks(pipeline):
    llm, prompts, tokens, logprobs, pp = pipeline
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts[:3]):
        engine.add_request(f"abort-{i}", prompt, PARAMS)
    while not any(any(item.seq.request.request_id == "abort-1" for item in sched.scheduled)
                  for sched, _, _ in engine.in_flight):
        engine.step()
    engine.abort_request("abort-1")  # its batch is still in flight
    done = {}
    while engine.has_unfinished_requests() or engine.in_flight:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == ["abort-0", "abort-2"]
    check_against([done["abort-0"], done["abort-2"]], [prompts[0], prompts[2]],
                  [tokens[0], tokens[2]], [logprobs[0], logprobs[2]])
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, stats


def test_a_forking_request_aborted_in_flight_leaves_no_fork_behind(pipeline):
    """n=2: the batch that samples the prompt's first tokens makes the
    second sequence; the request is aborted before that batch comes back, so
    neither sequence may take its token or free blocks again."""
    llm, prompts, tokens, logprobs, pp = pipeline
    engine = llm.llm_engine
    engine.add_request("fork", prompts[3], SamplingParams(n=2, temperature=1.0, seed=3,
                                                          max_tokens=1, ignore_eos=True))
    engine.add_request("other", prompts[0], PARAMS)
    engine.step()  # both admitted in one batch, now in flight
    assert any(item.forks for sched, _, _ in engine.in_flight for item in sched.scheduled)
    engine.abort_request("fork")
    appended = []
    append = engine.scheduler._append_token

    def recording(seq, *args):
        appended.append(seq.request.request_id)
        return append(seq, *args)

    engine.scheduler._append_token = recording
    done = {}
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id == "other", out
                if out.finished:
                    done[out.request_id] = out
    finally:
        del engine.scheduler._append_token
    assert "fork" not in appended
    check_against([done["other"]], [prompts[0]], [tokens[0]], [logprobs[0]])
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks, stats


def test_layer_partition():
    assert layer_partition(30, 2) == [15, 15]
    assert layer_partition(30, 4) == [7, 8, 8, 7]  # the remainder before the last stage
    assert layer_partition(5, 3) == [2, 2, 1]
    stages = [PipelineStage(r, 3, 5) for r in range(3)]
    assert [(s.first_layer, s.last_layer) for s in stages] == [(0, 2), (2, 4), (4, 5)]
    assert stages[0].is_first and stages[2].is_last and not stages[1].is_last
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        layer_partition(2, 3)


def test_layer_partition_from_the_environment(monkeypatch):
    monkeypatch.setenv(PARTITION_ENV, "3,1")
    assert layer_partition(4, 2) == [3, 1]
    for bad in ("2,1", "4,0", "x,y", "1,1,2"):
        monkeypatch.setenv(PARTITION_ENV, bad)
        with pytest.raises(ValueError, match=PARTITION_ENV):
            layer_partition(4, 2)


def test_unrunnable_pipelines_are_refused_before_any_process_starts(tiny_model_dir):
    hf_config = load_model(tiny_model_dir).hf_config  # two layers
    three = EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=3))
    with pytest.raises(ValueError, match="every stage needs at least one"):
        check_pipeline(three, CPUPlatform(), hf_config)
    spec = EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=2),
                        speculative=SpeculativeConfig(num_speculative_tokens=2))
    with pytest.raises(ValueError, match="speculative decoding cannot run with pipeline"):
        check_pipeline(spec, CPUPlatform(), hf_config)

    class NoPipelines(CPUPlatform):
        name = "nopipe"

        @property
        def capabilities(self):
            import dataclasses

            return dataclasses.replace(super().capabilities, pipeline_parallel=False)

    two = EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="not supported on nopipe"):
        check_pipeline(two, NoPipelines(), hf_config)
    from pllm.core.engine import LLMEngine
    from pllm.entrypoints.engine_args import EngineArgs

    args = EngineArgs(model=tiny_model_dir, kv_cache_memory="8MB", pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="not supported on nopipe"):
        LLMEngine(args.create_engine_config(), platform=NoPipelines())
