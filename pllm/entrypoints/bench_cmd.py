"""`pllm bench throughput | latency | serve`: the standard workloads, each beside
a baseline measured in the same run (see pllm/bench/).

    pllm bench throughput --compare hf             # 64 mixed requests, pllm vs HF transformers
    pllm bench latency --compare hf                # batch 1, 128 + 128 tokens, vs read bandwidth
    pllm bench serve --request-rate 1 2 4          # a running `pllm serve` at 127.0.0.1:8000
    pllm bench serve --launch pllm --launch-command 'llama=llama-server -m m.gguf --port {port}'
                                                   # both started afresh for every rate

Each writes JSON (default bench-results/<kind>-<time>.json) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from pllm.bench.runs import BASELINE_CHOICES, BenchArgumentError
from pllm.bench.runs import run_latency as _latency
from pllm.bench.runs import run_serve as _serve
from pllm.bench.runs import run_throughput as _throughput
from pllm.entrypoints.engine_args import EngineArgs

# ---------------------------------------------------------------- arguments


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("results")
    g.add_argument("--output-json", default=None,
                   help="where to write the results (default bench-results/<kind>-<time>.json)")
    g.add_argument("--plot", default=None, help="PNG to draw (default: beside the JSON)")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")


def _add_workload_args(parser: argparse.ArgumentParser, num_prompts: int) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=num_prompts,
                   help=f"requests in the workload (default {num_prompts})")
    g.add_argument("--input-len-range", default="16,256",
                   help="prompt lengths, uniform in LO,HI inclusive (default 16,256)")
    g.add_argument("--output-len-range", default="32,128",
                   help="output lengths, uniform in LO,HI inclusive (default 32,128)")
    g.add_argument("--dataset", default="random",
                   help="prompt tokens: 'random' (ordinary vocabulary ids), 'text' (built-in "
                        "English prose), 'grounded' (chat requests whose answers copy from "
                        "their prompts; their own lengths) or a UTF-8 text file; lengths are "
                        "the same for all")


def _add_compare_args(parser: argparse.ArgumentParser, kind: str) -> None:
    g = parser.add_argument_group("baselines")
    names = ", ".join(BASELINE_CHOICES[kind])
    g.add_argument("--compare", action="append", default=[], metavar="NAME",
                   help=f"baseline to run in the same run, repeatable or comma-separated: {names} "
                        f"('hf' = {' + '.join(BASELINE_CHOICES[kind]['hf'])}); or pllm-DEVICE: "
                        "pllm itself on another platform, with the same engine arguments and "
                        "requests (e.g. --device ipex --compare pllm-cpu); or no-spec: pllm "
                        "without its --speculative-config; or no-structured: the requests "
                        "without their --structured-output schemas; or executor-mp / "
                        "executor-ray: pllm with that --distributed-executor-backend; or "
                        "parallel-TPxPP: pllm with -tp TP -pp PP (e.g. parallel-2x1)")
    g.add_argument("--baseline-timeout", type=float, default=3600.0,
                   help="seconds a baseline may run before it is recorded as failed (default 3600)")
    if kind == "throughput":
        g.add_argument("--hf-batch-size", type=int, default=16,
                       help="requests per static HF generate batch (default 16)")
        g.add_argument("--hf-order", choices=["arrival", "sorted"], default="arrival",
                       help="HF static batches in arrival order (default) or sorted by prompt "
                            "length (less padding)")
        g.add_argument("--hf-page-size", type=int, default=64,
                       help="tokens per page of HF generate_batch's paged cache (default 64)")


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser, model_positional=False)  # --seed also seeds the workload
    _add_workload_args(parser, num_prompts=64)
    parser.add_argument("--structured-output", choices=["json"], default=None,
                        help="hold each request's output to a JSON schema (eight distinct "
                             "ones, none that can close before the output length); "
                             "--compare no-structured runs the same requests without")
    _add_compare_args(parser, "throughput")
    _add_output_args(parser)


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser, model_positional=False)
    g = parser.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    g.add_argument("--output-len", type=int, default=128, help="output tokens (default 128)")
    g.add_argument("--num-iters", type=int, default=3, help="timed requests (default 3)")
    g.add_argument("--num-iters-warmup", type=int, default=1,
                   help="untimed requests first (default 1)")
    g.add_argument("--dataset", default="random",
                   help="'random', 'text', 'grounded' (chat requests whose answers copy from "
                        "their prompts: rewrite, extract, edit code; prompt lengths are their "
                        "own) or a text file")
    g.add_argument("--bandwidth-mib", type=int, default=256,
                   help="size of the tensor the read-bandwidth probe sums (default 256 MiB)")
    _add_compare_args(parser, "latency")
    _add_output_args(parser)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=None,
                   help="OpenAI-compatible API root of a running server "
                        "(default http://127.0.0.1:8000/v1)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow a host other than this machine's loopback")
    g.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    g.add_argument("--served-model-name", default=None,
                   help="model name to request (default: the first of /v1/models)")
    g.add_argument("--model", default=None,
                   help="model whose tokenizer builds the prompts, and that --launch pllm "
                        "serves (default: SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    g.add_argument("--request-rate", type=float, nargs="+", default=[1.0],
                   help="Poisson request rates in requests/s, one run each; inf = all at once")
    g.add_argument("--max-seconds", type=float, default=120.0,
                   help="no request starts later than this into a rate's run (default 120)")
    g.add_argument("--drain-seconds", type=float, default=60.0,
                   help="how long requests may run on after that before they are cancelled")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrivals")
    g = parser.add_argument_group(
        "launched servers", "instead of --base-url: start each server afresh on a free "
        "loopback port for every rate, run that rate, stop it; one row per server and rate, "
        "with the pllm server's figures over each other server's")
    g.add_argument("--launch", choices=["pllm"], default=None,
                   help="start `pllm serve` with --model and --tokenizer")
    g.add_argument("--pllm-args", default="",
                   help="more `pllm serve` arguments, one quoted string "
                        "(--pllm-args='--max-num-seqs 16 --enforce-eager')")
    g.add_argument("--launch-command", action="append", default=[], metavar="NAME=COMMAND",
                   help="start another server, repeatable: a command line with {host} and "
                        "{port} placeholders, e.g. llama-server='llama-server -m model.gguf "
                        "--host {host} --port {port} -np 16'")
    g.add_argument("--ready-timeout", type=float, default=600.0,
                   help="seconds a started server may take to answer /v1/models (default 600)")
    g.add_argument("--stop-timeout", type=float, default=15.0,
                   help="seconds from SIGTERM to SIGKILL when stopping one (default 15)")
    _add_workload_args(parser, num_prompts=64)
    _add_output_args(parser)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="benchmark throughput, latency or a server",
                                  description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_bench_subcommands(bench)
    return bench


def _add_bench_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True)
    for name, add, func, text in (
        ("throughput", add_throughput_args, run_throughput,
         "offline throughput on a mixed workload (useful output tokens/s)"),
        ("latency", add_latency_args, run_latency,
         "batch-1 decode speed, TTFT and the share of the memory bandwidth used"),
        ("serve", add_serve_args, run_serve,
         "TTFT / inter-token latency of an OpenAI-compatible server under Poisson load"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        add(p)
        p.set_defaults(func=func)


# ---------------------------------------------------------------- running


def _guarded(run):
    """``run(args)`` as a command: user errors end it with a one-line message and status 2."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from pllm.bench.serve import ServeBenchError
        from pllm.bench.workload import WorkloadError
        from pllm.loader import ModelLoadError

        try:
            run(args)
            return 0
        except (BenchArgumentError, WorkloadError, ServeBenchError, ModelLoadError) as exc:
            print(f"pllm bench {args.bench_command}: error: {exc}", file=sys.stderr)
            return 2

    return wrapper


run_throughput = _guarded(_throughput)
run_latency = _guarded(_latency)
run_serve = _guarded(_serve)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pllm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_bench_subcommands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
