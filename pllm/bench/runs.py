"""The three benchmarks, end to end: build the workload, time pllm, run the
baselines in subprocesses, then write the JSON and the plot.

``args`` is the namespace `pllm bench <kind>` parses (see
pllm/entrypoints/bench_cmd.py); each ``run_*`` returns the result it wrote.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import re
import sys
import time

from pllm.core.config import EXECUTOR_BACKENDS
from pllm.entrypoints.engine_args import EngineArgs

# --compare names; "hf" is every HF baseline that fits the benchmark.
BASELINE_CHOICES = {
    "throughput": {"hf": ["hf-generate", "hf-generate-batch"], "hf-generate": ["hf-generate"],
                   "hf-generate-batch": ["hf-generate-batch"]},
    "latency": {"hf": ["hf-generate"], "hf-generate": ["hf-generate"]},
}


class BenchArgumentError(ValueError):
    """A bench option a user got wrong."""


# ---------------------------------------------------------------- shared steps


PLLM_BASELINE = "pllm-"  # pllm-DEVICE: pllm on another platform (throughput, latency)
# pllm with the same arguments but no --speculative-config (throughput, latency).
NO_SPEC = "no-spec"
# The same requests without their --structured-output schemas (throughput).
NO_STRUCTURED = "no-structured"
# executor-mp / executor-ray: pllm with the other --distributed-executor-backend.
EXECUTOR_BASELINE = "executor-"
# parallel-TPxPP: pllm with --tensor-parallel-size TP --pipeline-parallel-size PP.
PARALLEL_BASELINE = "parallel-"
_PARALLEL = re.compile(r"parallel-(\d+)x(\d+)")
# Baselines that are pllm itself with other arguments.
_PLLM_VARIANTS = (PLLM_BASELINE, EXECUTOR_BASELINE, PARALLEL_BASELINE)


def _baselines(kind: str, compare: list[str]) -> list[str]:
    known = BASELINE_CHOICES[kind]
    names: list[str] = []
    for item in compare:
        for name in filter(None, (s.strip() for s in item.split(","))):
            if kind in ("throughput", "latency") and (
                    (name.startswith(PLLM_BASELINE) and len(name) > 5)
                    or name in (NO_SPEC, NO_STRUCTURED)
                    or name in (f"{EXECUTOR_BASELINE}{b}" for b in EXECUTOR_BACKENDS)
                    or _PARALLEL.fullmatch(name)):
                names += [name] if name not in names else []
                continue
            if name not in known:
                raise BenchArgumentError(
                    f"unknown --compare {name!r} for bench {kind}; choose from {', '.join(known)}")
            names += [n for n in known[name] if n not in names]
    return names


def _header(kind: str, model: str) -> dict:
    from pllm.bench.machine import machine_info, versions

    return {"kind": kind, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model,
            "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else [],
            "machine": machine_info(), "versions": versions()}


def _finish(result: dict, args, plot) -> None:
    from pllm.bench.report import default_output_path, write_json

    path = args.output_json or default_output_path(result["kind"])
    if not args.no_plot:
        result["plot"] = args.plot or os.path.splitext(path)[0] + ".png"
    write_json(result, path)
    if not args.no_plot:
        plot(result, result["plot"])
    print(f"results: {path}" + ("" if args.no_plot else f"\nplot: {result['plot']}"))


def _hf_folder(engine) -> str:
    """The HF folder transformers loads: the model folder, or a float32 copy
    of a GGUF's conversion (which keeps the file's blocks)."""
    from pllm.loader.gguf_file import dequantized_folder

    path = engine.loaded.path
    return dequantized_folder(path) if path.endswith(".gguf") else path


def _baseline_spec(engine, mode: str, requests) -> dict:
    import torch

    from pllm.bench.offline import engine_dtype_and_device

    dtype, device = engine_dtype_and_device(engine)
    cfg = engine.loaded.hf_config
    eos = list(engine.loaded.eos_token_ids)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else engine.tokenizer.pad_token_id
    return {"mode": mode, "model_folder": _hf_folder(engine), "dtype": dtype, "device": device,
            "num_threads": torch.get_num_threads(),
            "pad_token_id": pad if pad is not None else (eos[0] if eos else 0),
            "eos_token_id": eos or None,
            "requests": [[r.prompt_token_ids, r.output_len] for r in requests]}


def _make_llm(args):
    from pllm.entrypoints.llm import LLM

    ea = EngineArgs.from_cli_args(args)
    t0 = time.perf_counter()
    llm = LLM(**vars(ea))
    return ea, llm, round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------- throughput


def run_throughput(args) -> dict:
    from pllm.bench import report
    from pllm.bench.hf_baseline import BASELINE_MODES, run_baseline
    from pllm.bench.machine import children_rss_bytes, peak_rss_bytes
    from pllm.bench.offline import run_throughput as pllm_throughput
    from pllm.bench.workload import build_requests, parse_range, with_schemas, workload_summary

    baselines = _baselines("throughput", args.compare)
    in_range = parse_range(args.input_len_range, "--input-len-range")
    out_range = parse_range(args.output_len_range, "--output-len-range")
    ea, llm, startup_s = _make_llm(args)
    engine = llm.llm_engine
    requests = build_requests(engine.tokenizer, engine.loaded.hf_config.vocab_size,
                              num_requests=args.num_prompts, input_range=in_range,
                              output_range=out_range, seed=args.seed, dataset=args.dataset)
    plain = requests
    if getattr(args, "structured_output", None) == "json":
        requests = with_schemas(requests)
    elif NO_STRUCTURED in baselines:
        raise BenchArgumentError("--compare no-structured needs --structured-output")
    result = _header("throughput", engine.model_name)
    result["workload"] = {"num_prompts": args.num_prompts, "input_len_range": list(in_range),
                          "output_len_range": list(out_range), "seed": args.seed,
                          "dataset": args.dataset, "ignore_eos": True, "temperature": 0.0,
                          "structured_output": getattr(args, "structured_output", None),
                          **workload_summary(requests)}
    result["engine_args"] = vars(ea)
    print(f"pllm: {len(requests)} requests ({result['workload']['num_prompt_tokens']} prompt + "
          f"{result['workload']['num_output_tokens']} output tokens)", flush=True)
    result["pllm"] = pllm_throughput(llm, requests, use_tqdm=sys.stderr.isatty())
    result["pllm"].update(peak_rss_bytes=peak_rss_bytes(), startup_s=startup_s,
                          children_rss_bytes=children_rss_bytes(),
                          **_layout(engine))
    if (spec := spec_figures(engine)) is not None:
        result["pllm"]["spec_decode"] = spec
    specs = {name: _baseline_spec(engine, BASELINE_MODES[name], plain) for name in baselines
             if not name.startswith(_PLLM_VARIANTS)
             and name not in (NO_SPEC, NO_STRUCTURED)}
    llm.shutdown()
    del llm, engine  # pllm's weights and KV cache go back before a baseline loads its own
    gc.collect()
    result["baselines"] = {}
    for name in baselines:
        if name == NO_STRUCTURED:
            result["baselines"][name] = _pllm_on(ea, ea.device, plain,
                                                 label="without the schemas")
        elif name.startswith(_PLLM_VARIANTS) or name == NO_SPEC:
            result["baselines"][name] = _pllm_baseline(ea, name, requests)
    result["baseline_settings"] = {"hf_batch_size": args.hf_batch_size, "hf_order": args.hf_order,
                                   "hf_page_size": args.hf_page_size,
                                   "hf_max_batch_tokens": ea.max_num_batched_tokens}
    for name, spec in specs.items():
        print(f"{name}: running ...", flush=True)
        spec.update(batch_size=args.hf_batch_size, order=args.hf_order,
                    page_size=args.hf_page_size, max_batch_tokens=ea.max_num_batched_tokens)
        result["baselines"][name] = run_baseline(spec, timeout_s=args.baseline_timeout)
    key = "useful_output_tokens_per_s"
    result["figure"] = key
    result["ratios"] = report.ratios(result["pllm"][key], result["baselines"], key)
    report.print_throughput(result)
    _finish(result, args, report.plot_throughput)
    return result


def _pllm_baseline(ea, name: str, requests, num_warmup: int | None = None) -> dict:
    """A pllm baseline: ``pllm-DEVICE``, ``no-spec``, ``executor-BACKEND``
    or ``parallel-TPxPP``."""
    import dataclasses

    if (layout := _PARALLEL.fullmatch(name)) is not None:
        tp, pp = int(layout[1]), int(layout[2])
        if min(tp, pp) < 1:
            return {"error": f"--compare {name}: sizes must be >= 1"}
        if (tp, pp) == (ea.tensor_parallel_size, ea.pipeline_parallel_size):
            return {"error": f"--compare {name}: pllm itself runs with that layout"}
        return _pllm_on(dataclasses.replace(ea, tensor_parallel_size=tp,
                                            pipeline_parallel_size=pp), ea.device, requests,
                        num_warmup, label=f"with -tp {tp} -pp {pp}")

    if name.startswith(EXECUTOR_BASELINE):
        backend = name[len(EXECUTOR_BASELINE):]
        if ea.tensor_parallel_size * ea.pipeline_parallel_size == 1:
            return {"error": f"--compare {name} needs several ranks (tensor or pipeline "
                             "parallel; one rank "
                             "runs in this process whatever the backend)"}
        if backend == ea.distributed_executor_backend:
            return {"error": f"--compare {name}: pllm itself runs with the {backend} executor"}
        return _pllm_on(dataclasses.replace(ea, distributed_executor_backend=backend), ea.device,
                        requests, num_warmup, label=f"with the {backend} executor")

    if name == NO_SPEC:
        if not ea.speculative_config:
            return {"error": "--compare no-spec needs --speculative-config"}
        return _pllm_on(dataclasses.replace(ea, speculative_config=None), ea.device, requests,
                        num_warmup, label="without speculation")
    return _pllm_on(ea, name[len(PLLM_BASELINE):], requests, num_warmup)


def _layout(engine) -> dict:
    """How a result's engine ran its ranks."""
    from pllm.models.parallel import layer_partition

    par = engine.config.parallel
    layout = {"executor": par.distributed_executor_backend,
              "tensor_parallel_size": par.tensor_parallel_size,
              "pipeline_parallel_size": par.pipeline_parallel_size}
    if par.pipeline_parallel_size > 1:  # each stage's layers (PLLM_PP_LAYER_PARTITION)
        layout["layer_partition"] = layer_partition(engine.loaded.hf_config.num_hidden_layers,
                                                    par.pipeline_parallel_size)
    return layout


def spec_figures(engine) -> dict | None:
    """Speculative decoding's counters, for a result (None when it is off)."""
    spec = engine.get_stats().spec_decode
    if spec is None:
        return None
    return {"num_steps": spec.num_steps, "num_drafts": spec.num_proposals,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            "acceptance_rate": spec.acceptance_rate,
            "mean_accepted_length": spec.mean_accepted_length}


def _pllm_on(ea, device: str, requests, num_warmup: int | None = None,
             label: str | None = None) -> dict:
    """pllm with the same engine arguments and requests on ``device`` (a
    baseline of the same run): its throughput, or with ``num_warmup`` its
    latency; its start-up time is recorded."""
    from pllm.bench.offline import run_latency as pllm_latency
    from pllm.bench.offline import run_throughput as pllm_throughput
    from pllm.entrypoints.llm import LLM

    print(f"pllm {label or f'on --device {device}'}: running ...", flush=True)
    t0 = time.perf_counter()
    try:
        llm = LLM(**{**vars(ea), "device": device})
    except Exception as e:  # noqa: BLE001  (recorded, as a failed HF baseline is)
        return {"error": f"{type(e).__name__}: {e}"}
    try:
        start = time.perf_counter() - t0
        try:
            if num_warmup is None:
                figures = pllm_throughput(llm, requests)
            else:
                figures = pllm_latency(llm, requests, num_warmup=num_warmup)
        except Exception as e:  # noqa: BLE001  (recorded; the main result is kept)
            return {"error": f"{type(e).__name__}: {e}", "startup_s": round(start, 1)}
        from pllm.bench.machine import children_rss_bytes

        engine = llm.llm_engine
        figures.update(startup_s=round(start, 1), device=engine.platform.name,
                       dtype=engine.config.model.dtype, children_rss_bytes=children_rss_bytes(),
                       **_layout(engine))
        return figures
    finally:
        llm.shutdown()


# ---------------------------------------------------------------- latency


def run_latency(args) -> dict:
    from pllm.bench import report
    from pllm.bench.hf_baseline import run_baseline
    from pllm.bench.machine import children_rss_bytes, measure_read_bandwidth, peak_rss_bytes
    from pllm.bench.offline import decode_weight_bytes
    from pllm.bench.offline import run_latency as pllm_latency
    from pllm.bench.workload import build_requests, workload_summary

    baselines = _baselines("latency", args.compare)
    if args.num_iters < 1 or args.num_iters_warmup < 0 or args.output_len < 2 or args.input_len < 1:
        raise BenchArgumentError("need --num-iters >= 1, --num-iters-warmup >= 0, "
                                 "--input-len >= 1 and --output-len >= 2")
    ea, llm, startup_s = _make_llm(args)
    engine = llm.llm_engine
    requests = build_requests(engine.tokenizer, engine.loaded.hf_config.vocab_size,
                              num_requests=args.num_iters_warmup + args.num_iters,
                              input_range=(args.input_len, args.input_len),
                              output_range=(args.output_len, args.output_len),
                              seed=args.seed, dataset=args.dataset)
    result = _header("latency", engine.model_name)
    result["workload"] = {"batch_size": 1, "input_len": args.input_len,
                          "output_len": args.output_len,
                          "num_iters": args.num_iters, "num_iters_warmup": args.num_iters_warmup,
                          "seed": args.seed, "dataset": args.dataset, "ignore_eos": True,
                          "temperature": 0.0, **workload_summary(requests)}
    result["engine_args"] = vars(ea)
    result["pllm"] = pllm = pllm_latency(llm, requests, num_warmup=args.num_iters_warmup)
    if (spec := spec_figures(engine)) is not None:
        pllm["spec_decode"] = spec
    pllm.update(peak_rss_bytes=peak_rss_bytes(),  # before the bandwidth probe's tensor
                startup_s=startup_s, children_rss_bytes=children_rss_bytes(),
                **_layout(engine))
    weight_bytes = decode_weight_bytes(engine)
    specs = {name: _baseline_spec(engine, "latency", requests) for name in baselines
             if not name.startswith(_PLLM_VARIANTS) and name != NO_SPEC}
    llm.shutdown()
    del llm, engine
    gc.collect()
    bw = measure_read_bandwidth(args.bandwidth_mib)
    if weight_bytes is None:  # pipeline stages: rank 0 does not see every weight
        result["bandwidth"] = {**bw, "weight_bytes": None, "achieved_gb_per_s": None,
                               "bandwidth_fraction": None, "decode_ceiling_tokens_per_s": None}
        weight_bytes = 0
    else:
        achieved = weight_bytes / pllm["time_per_output_token_s"] / 1e9
        result["bandwidth"] = {
            **bw, "weight_bytes": weight_bytes, "achieved_gb_per_s": achieved,
            "bandwidth_fraction": achieved / bw["read_bandwidth_gb_per_s"],
            "decode_ceiling_tokens_per_s": bw["read_bandwidth_gb_per_s"] * 1e9 / weight_bytes,
        }
    result["baselines"] = {}
    for name in baselines:
        if name.startswith(_PLLM_VARIANTS) or name == NO_SPEC:
            base = _pllm_baseline(ea, name, requests, args.num_iters_warmup)
            if base.get("time_per_output_token_s") and weight_bytes:
                base["bandwidth_fraction"] = (weight_bytes / base["time_per_output_token_s"] / 1e9
                                              / bw["read_bandwidth_gb_per_s"])
            result["baselines"][name] = base
    for name, spec in specs.items():
        print(f"{name}: running ...", flush=True)
        spec["num_warmup"] = args.num_iters_warmup
        base = run_baseline(spec, timeout_s=args.baseline_timeout)
        if base.get("time_per_output_token_s") and weight_bytes:
            base["bandwidth_fraction"] = (weight_bytes / base["time_per_output_token_s"] / 1e9
                                          / bw["read_bandwidth_gb_per_s"])
        result["baselines"][name] = base
    result["figure"] = "decode_tokens_per_s"
    result["ratios"] = report.ratios(pllm["decode_tokens_per_s"], result["baselines"],
                                     "decode_tokens_per_s")
    # > 1: pllm's first token comes sooner.
    result["ttft_speedups"] = {name: (b["ttft_s"] / pllm["ttft_s"] if b.get("ttft_s") else None)
                               for name, b in result["baselines"].items()}
    report.print_latency(result)
    _finish(result, args, report.plot_latency)
    return result


# ---------------------------------------------------------------- serve


def _server_commands(args) -> list:
    """The servers to start, in order (pllm first); none: drive --base-url."""
    from pllm.bench.launch import ServerCommand, pllm_command

    if args.pllm_args and not args.launch:
        raise BenchArgumentError("--pllm-args needs --launch pllm")
    commands = [pllm_command(args.model, args.tokenizer, args.pllm_args)] if args.launch else []
    commands += [ServerCommand.parse(text) for text in args.launch_command]
    names = [c.name for c in commands]
    if len(set(names)) < len(names):
        raise BenchArgumentError(f"two launched servers share a name: {', '.join(names)}")
    if commands and (args.base_url or args.served_model_name):
        raise BenchArgumentError("--base-url and --served-model-name are for a running server; "
                                 "launched servers are reached on their own ports")
    return commands


def run_serve(args) -> dict:
    from pllm.bench import report
    from pllm.bench.launch import run_launched_bench
    from pllm.bench.serve import check_loopback, run_serve_bench
    from pllm.bench.workload import build_requests, parse_range, workload_summary
    from pllm.loader import DEFAULT_MODEL, load_model

    commands = _server_commands(args)
    base_url = args.base_url or "http://127.0.0.1:8000/v1"
    if not commands:
        check_loopback(base_url, args.allow_remote)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if any(not (r > 0) for r in args.request_rate):
        raise BenchArgumentError(
            f"--request-rate values must be > 0 (or inf), got {args.request_rate}")
    in_range = parse_range(args.input_len_range, "--input-len-range")
    out_range = parse_range(args.output_len_range, "--output-len-range")
    loaded = load_model(args.model, tokenizer=args.tokenizer)
    # Every rate gets the same lengths but prompts of its own: a server with
    # prefix caching would otherwise serve the later rates' prefills from cache.
    per_rate = [build_requests(loaded.tokenizer, loaded.hf_config.vocab_size,
                               num_requests=args.num_prompts, input_range=in_range,
                               output_range=out_range, seed=args.seed, dataset=args.dataset,
                               prompt_seed=args.seed + 7919 * i)
                for i in range(len(args.request_rate))]
    requests = per_rate[0]
    bench = dict(max_seconds=args.max_seconds, drain_seconds=args.drain_seconds, seed=args.seed,
                 api_key=args.api_key)
    if commands:
        runs = asyncio.run(run_launched_bench(
            commands, args.request_rate, per_rate, ready_timeout_s=args.ready_timeout,
            stop_grace_s=args.stop_timeout, **bench))
        runs["model"] = args.model or DEFAULT_MODEL
    else:
        runs = asyncio.run(run_serve_bench(base_url, requests, args.request_rate,
                                           model=args.served_model_name,
                                           requests_per_rate=per_rate, **bench))
    result = _header("serve", runs["model"])
    result["workload"] = {"num_prompts": args.num_prompts, "input_len_range": list(in_range),
                          "output_len_range": list(out_range), "seed": args.seed,
                          "dataset": args.dataset, "ignore_eos": True, "temperature": 0.0,
                          "structured_output": getattr(args, "structured_output", None),
                          "request_rates": ["inf" if math.isinf(r) else r
                                            for r in args.request_rate],
                          "max_seconds": args.max_seconds, "drain_seconds": args.drain_seconds,
                          "prompts_per_rate": "the same lengths at every rate; the i-th rate's "
                                              "prompt tokens are drawn with seed + 7919 * i",
                          **workload_summary(requests)}
    if commands:
        result.update(servers=runs["servers"], per_rate=runs["per_rate"], reference="pllm",
                      ratios=report.serve_ratios(runs["per_rate"], "pllm"))
    else:
        result.update(base_url=runs["base_url"], per_rate=runs["per_rate"])
    report.print_serve(result)
    _finish(result, args, report.plot_serve)
    return result
