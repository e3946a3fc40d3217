"""pllm's side of the throughput and latency benchmarks, run in this process."""

from __future__ import annotations

import time

from pllm.bench.figures import latency_figures, throughput_figures
from pllm.bench.workload import BenchRequest
from pllm.core.sampling_params import SamplingParams, StructuredOutputsParams


def bench_params(output_len: int, schema: dict | None = None) -> SamplingParams:
    """Greedy (as the HF baselines), exactly ``output_len`` tokens; with
    ``schema``, held to that JSON schema (structured outputs)."""
    structured = None if schema is None else StructuredOutputsParams(json=schema)
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True,
                          structured_outputs=structured)


def warm_up(llm, requests: list[BenchRequest], num_requests: int = 4, output_len: int = 4) -> None:
    """A short batch first, so lazy initialisation stays out of the timed run.

    Its prompts repeat one token, so they share no prefix-cache block with the workload."""
    prompts = [[r.prompt_token_ids[0]] * 24 for r in requests[:num_requests]]
    params = [bench_params(output_len, r.schema) for r in requests[:num_requests]]
    llm.generate(prompts, params, use_tqdm=False)


def compilations(llm) -> tuple[int, float] | None:
    """Programs the platform compiled so far and the seconds it took (None
    where it compiles nothing per shape)."""
    return llm.llm_engine.platform.compilations()


def compile_figures(before: tuple[int, float] | None, after: tuple[int, float] | None) -> dict:
    """Start-up compilations (``before``: the warm-up) and those the timed run added."""
    if before is None or after is None:
        return {}
    return {"compilations_at_start": before[0], "compile_s_at_start": round(before[1], 2),
            "compilations_during_run": after[0] - before[0],
            "compile_s_during_run": round(after[1] - before[1], 2)}


def run_throughput(llm, requests: list[BenchRequest], *, use_tqdm: bool = False) -> dict:
    """All requests submitted at once; the clock covers ``generate`` only."""
    warm_up(llm, requests)
    params = [bench_params(r.output_len, r.schema) for r in requests]
    before = compilations(llm)
    t0 = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - t0
    after = compilations(llm)
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    useful = sum(min(n, r.output_len) for n, r in zip(generated, requests))
    figures = throughput_figures(
        elapsed, num_requests=len(requests), num_prompt_tokens=sum(r.prompt_len for r in requests),
        num_useful_tokens=useful, num_generated_tokens=sum(generated))
    figures["num_short_outputs"] = sum(n < r.output_len for n, r in zip(generated, requests))
    figures.update(compile_figures(before, after))
    return figures


def _timed_request(engine, request_id: str, request: BenchRequest) -> tuple[float, list[float]]:
    """(submit time, time each output token came out of ``engine.step``)."""
    start = time.perf_counter()
    engine.add_request(request_id, request.prompt_token_ids,
                       bench_params(request.output_len, request.schema))
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id == request_id:
                stamps += [now] * (len(out.outputs[0].token_ids) - len(stamps))
    return start, stamps


def run_latency(llm, requests: list[BenchRequest], *, num_warmup: int) -> dict:
    """Batch 1, one request after another: the first ``num_warmup`` untimed.

    Each request has its own prompt, so no run reuses another's prefix cache."""
    engine = llm.llm_engine
    before = compilations(llm)
    runs = [_timed_request(engine, f"bench-latency-{i}", r) for i, r in enumerate(requests)]
    return {**latency_figures(runs[num_warmup:]), **compile_figures(before, compilations(llm))}


def decode_weight_bytes(engine) -> int | None:
    """Bytes of weights one decode step reads: every parameter, except an input
    embedding that is not also the LM head (a step reads only a row of it).
    Weights kept quantized count their bytes as stored.
    Under tensor parallelism, rank 0's share times the ranks (they hold equal
    shares of the layers and the LM head, and each a copy of the norms).
    None under pipeline parallelism: rank 0 holds the first stage's alone."""
    import torch

    if engine.config.parallel.pipeline_parallel_size > 1:
        return None

    from pllm.models.quant import QuantLinear

    model = engine.executor.worker.model
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    read = {id(p): p.numel() * p.element_size() for p in model.parameters()
            if id(p) not in embeddings or p is head}
    for linear in model.modules():
        if isinstance(linear, QuantLinear):
            for segment in linear.segments:
                if isinstance(segment, torch.Tensor):
                    read[id(segment)] = segment.numel() * segment.element_size()
                else:  # a kept weight (blocks, planes, fp8), counted once
                    read[id(segment)] = segment.nbytes
    return sum(read.values()) * engine.config.parallel.tensor_parallel_size


def engine_dtype_and_device(engine) -> tuple[str, str]:
    """The dtype and torch device pllm runs on, for the baselines to match."""
    return engine.config.model.dtype, str(engine.executor.worker.device)
