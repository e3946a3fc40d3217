"""GPU proof of the Triton PagedAttention backend (cuda platform; rocm reuses it).

Run from the repository root (pllm need not be installed; only torch with
CUDA and triton are needed)::

    PYTHONPATH=. python ci/legs/cuda/gpu_check.py SUMMARY.json
    ci/legs/cuda/gpu_check.sh SUMMARY.json      # the same, with a header

1. correctness: every case of ``pllm.platforms.triton.kernels.selfcheck`` (the
   small interpreter cases plus realistic shapes: 64 seqs x 2k context, GQA,
   head_dim 64/128/256, 16k split-KV decodes, mixed prefill chunks, sliding
   window) compiled, in fp32, fp16 and bf16, against ``reference_attention``;
2. timing: decode attention (Triton, and Triton without split-KV) against
   torch SDPA on contiguous K/V and on K/V gathered from the paged cache;
   one causal prefill against SDPA.

Everything lands in the JSON summary, written after each stage so a crash or
timeout still leaves what finished. Exit status: 0 every check passed, 1 a
correctness check failed, 2 no usable GPU or a setup error.
``--smoke`` runs a tiny version on the CPU under ``TRITON_INTERPRET=1`` to
test this script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass

T0 = time.monotonic()


def log(msg: str = "", **_: object) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class DecodeBench:
    batch: int
    context: int
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "fp16"
    block_size: int = 16

    @property
    def name(self) -> str:
        return (f"decode B{self.batch} L{self.context} H{self.num_heads}/{self.num_kv_heads} "
                f"D{self.head_dim} {self.dtype} bs{self.block_size}")


DECODE_BENCHES = (
    DecodeBench(64, 2048),
    DecodeBench(64, 2048, dtype="bf16"),
    DecodeBench(64, 2048, head_dim=64),
    DecodeBench(256, 1024),
    DecodeBench(8, 8192),
    DecodeBench(1, 32768),
    DecodeBench(1, 32768, num_heads=8, num_kv_heads=1, block_size=32),
)
SMOKE_DECODE_BENCHES = (DecodeBench(2, 64, 4, 2, 64, "fp32"),)


class Summary:
    """The JSON summary, rewritten after every stage."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict = {"tool": "ci/legs/cuda/gpu_check.py", "status": "running", "errors": []}

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - T0, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def environment(torch, triton, device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "torch_hip": getattr(torch.version, "hip", None),
           "triton": triton.__version__, "device": str(device),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    return env


def time_ms(torch, fn, device, target_s: float = 0.25) -> float:
    """Median milliseconds of ``fn()`` (after a warm-up that also compiles)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    sync()
    iters = int(min(200, max(5, target_s / max((time.perf_counter() - start) / 3, 1e-6))))
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def host_overhead_us(torch, fn, device, calls: int = 50) -> float:
    """CPU time to enqueue one call (Python + launch), measured without
    waiting on the GPU: above the kernel time it, not the GPU, sets the pace."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round(elapsed / calls * 1e6, 1)


_SDPA_GQA: bool | None = None


def sdpa_fn(torch, q, k, v, scale, **kw):
    """SDPA with GQA: native ``enable_gqa`` (torch >= 2.5) or K/V heads
    repeated up front (outside the timed call)."""
    global _SDPA_GQA
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if _SDPA_GQA is None:
        try:
            t = torch.zeros(1, 2, 1, 16, device=q.device, dtype=q.dtype)
            sdpa(t, t[:, :1], t[:, :1], enable_gqa=True)
            _SDPA_GQA = True
        except TypeError:
            _SDPA_GQA = False
    if _SDPA_GQA:
        return lambda: sdpa(q, k, v, scale=scale, enable_gqa=True, **kw)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return lambda: sdpa(q, k, v, scale=scale, **kw)


def decode_inputs(torch, cfg: DecodeBench, device):
    """``(query, kv_cache, metadata)`` for ``cfg``: equal lengths, shuffled blocks."""
    from pllm.core.interfaces import AttentionMetadata
    from pllm.platforms.triton.kernels.selfcheck import DTYPES

    dtype = DTYPES[cfg.dtype]
    b, length, bs = cfg.batch, cfg.context, cfg.block_size
    nb = math.ceil(length / bs)
    cache = torch.randn(2, b * nb, bs, cfg.num_kv_heads, cfg.head_dim, device=device, dtype=dtype)
    tables = torch.randperm(b * nb, device=device).view(b, nb).to(torch.int32)
    q = torch.randn(b, cfg.num_heads, cfg.head_dim, device=device, dtype=dtype)
    md = AttentionMetadata(
        num_seqs=b, num_tokens=b, num_decodes=b, max_query_len=1, max_seq_len=length,
        block_size=bs, query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((b,), length, dtype=torch.int32, device=device),
        block_tables=tables, slot_mapping=torch.zeros(b, dtype=torch.int64, device=device),
        query_start_loc_cpu=list(range(b + 1)), seq_lens_cpu=[length] * b,
    )
    return q, cache, md


def bench_decode(torch, cfg: DecodeBench, device) -> dict:
    from pllm.platforms.triton.attention import TritonAttentionBackend

    b, length = cfg.batch, cfg.context
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, cache, md = decode_inputs(torch, cfg, device)
    tables = md.block_tables
    scale = d**-0.5
    split_backend, plain_backend = TritonAttentionBackend(), TritonAttentionBackend(max_splits=1)
    md = split_backend.prepare_metadata(md)
    splits = split_backend.num_decode_splits(md, hkv, device)

    def gathered():  # [b, hkv, length, d] K and V straight from the paged cache
        kv = cache[:, tables.long()].flatten(2, 3)[:, :, :length]
        return kv[0].transpose(1, 2), kv[1].transpose(1, 2)

    k_c, v_c = (t.contiguous() for t in gathered())
    q4 = q.view(b, h, 1, d)
    sdpa_contig = sdpa_fn(torch, q4, k_c, v_c, scale)

    def sdpa_paged():  # what a pure-torch paged backend does: gather, then SDPA
        k, v = gathered()
        return sdpa_fn(torch, q4, k, v, scale)()

    out = split_backend.forward(q, cache, md, scale=scale)
    ref = sdpa_contig().view(b, h, d)
    max_err = float((out.float() - ref.float()).abs().max())
    fns = {"triton": lambda: split_backend.forward(q, cache, md, scale=scale),
           "triton_no_split": lambda: plain_backend.forward(q, cache, md, scale=scale),
           "sdpa_contiguous": sdpa_contig, "sdpa_paged_gather": sdpa_paged}
    ms = {name: round(time_ms(torch, fn, device), 4) for name, fn in fns.items()}
    host_us = host_overhead_us(torch, fns["triton"], device)
    kv_bytes = 2 * b * length * hkv * d * cache.element_size()
    return {"name": cfg.name, **asdict(cfg), "num_splits": splits, "ms": ms,
            "triton_host_us_per_call": host_us,
            "triton_gb_per_s": round(kv_bytes / ms["triton"] / 1e6, 1),
            "speedup_vs_sdpa_contiguous": round(ms["sdpa_contiguous"] / ms["triton"], 2),
            "speedup_vs_sdpa_paged_gather": round(ms["sdpa_paged_gather"] / ms["triton"], 2),
            "max_abs_diff_vs_sdpa": max_err}


def bench_prefill(torch, device, *, seqs: int, length: int, dtype_name: str = "fp16",
                  h: int = 32, hkv: int = 8, d: int = 128, bs: int = 16) -> dict:
    """Fresh causal prefill of ``seqs`` x ``length`` tokens vs SDPA ``is_causal``."""
    from pllm.core.interfaces import AttentionMetadata
    from pllm.platforms.triton.attention import TritonAttentionBackend
    from pllm.platforms.triton.kernels.selfcheck import DTYPES

    dtype = DTYPES[dtype_name]
    nb = math.ceil(length / bs)
    n = seqs * length
    tables = torch.arange(seqs * nb, device=device).view(seqs, nb).to(torch.int32)
    cache = torch.randn(2, seqs * nb, bs, hkv, d, device=device, dtype=dtype)
    q = torch.randn(n, h, d, device=device, dtype=dtype)
    starts = [i * length for i in range(seqs + 1)]
    md = AttentionMetadata(
        num_seqs=seqs, num_tokens=n, num_decodes=0, max_query_len=length, max_seq_len=length,
        block_size=bs, query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((seqs,), length, dtype=torch.int32, device=device),
        block_tables=tables, slot_mapping=torch.zeros(n, dtype=torch.int64, device=device),
        query_start_loc_cpu=starts, seq_lens_cpu=[length] * seqs,
    )
    backend = TritonAttentionBackend()
    scale = d**-0.5
    # Contiguous tables: the cache is already [seqs, length, hkv, d] per K/V.
    kv = cache.view(2, seqs, nb * bs, hkv, d)[:, :, :length].transpose(2, 3).contiguous()
    q4 = q.view(seqs, length, h, d).transpose(1, 2)
    sdpa = sdpa_fn(torch, q4, kv[0], kv[1], scale, is_causal=True)
    out = backend.forward(q, cache, md, scale=scale)
    ref = sdpa().transpose(1, 2).reshape(n, h, d)
    ms = {"triton": round(time_ms(torch, lambda: backend.forward(q, cache, md, scale=scale),
                                  device), 4),
          "sdpa_causal_contiguous": round(time_ms(torch, sdpa, device), 4)}
    flops = 4 * seqs * h * d * length * (length + 1) / 2
    return {"name": f"prefill {seqs}x{length} H{h}/{hkv} D{d} {dtype_name}", "ms": ms,
            "triton_tflops": round(flops / ms["triton"] / 1e9, 1),
            "speedup_vs_sdpa": round(ms["sdpa_causal_contiguous"] / ms["triton"], 2),
            "max_abs_diff_vs_sdpa": float((out.float() - ref.float()).abs().max())}


DECODE_TUNE_SHAPES = (DecodeBench(64, 2048), DecodeBench(64, 2048, head_dim=64),
                      DecodeBench(8, 8192), DecodeBench(1, 32768))
DECODE_TUNE_CONFIGS = [(n, w, st) for n in (32, 64, 128)
                       for w, st in ((2, 2), (4, 2), (4, 3), (8, 2))]
PREFILL_TUNE_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                        (128, 32, 8, 2), (64, 32, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2)]


def _try_ms(torch, fn, device) -> float | str:
    try:
        return round(time_ms(torch, fn, device, target_s=0.05), 4)
    except Exception as exc:  # noqa: BLE001 (e.g. a tile that does not fit shared memory)
        return f"{type(exc).__name__}: {str(exc)[:120]}"


def tune_decode(torch, cfg: DecodeBench, device) -> dict:
    """Times (BLOCK_N, num_warps, num_stages) at the heuristic split count,
    then split counts with the best of them."""
    from pllm.platforms.triton.attention import TritonAttentionBackend
    from pllm.platforms.triton.kernels.decode import decode_attention

    q, cache, md = decode_inputs(torch, cfg, device)
    out = torch.empty_like(q)
    heuristic = TritonAttentionBackend().num_decode_splits(md, cfg.num_kv_heads, device)

    def run(config, splits):
        return lambda: decode_attention(q, cache, out, md.seq_lens, md.block_tables,
                                        num_seqs=cfg.batch, scale=0.1, num_splits=splits,
                                        config=config)

    by_config = {str(c): _try_ms(torch, run(c, heuristic), device) for c in DECODE_TUNE_CONFIGS}
    timed = {k: v for k, v in by_config.items() if isinstance(v, float)}
    best = min(timed, key=timed.get)
    best_cfg = tuple(int(x) for x in best.strip("()").split(","))
    by_splits = {n: _try_ms(torch, run(best_cfg, n), device)
                 for n in sorted({1, 2, 4, 8, 16, 32, 64, heuristic})}
    return {"name": cfg.name, "heuristic_splits": heuristic, "ms_by_config": by_config,
            "best_config": best, "ms_by_splits_with_best": by_splits}


def tune_prefill(torch, device, *, seqs: int, q_len: int, context: int) -> dict:
    from pllm.platforms.triton.kernels.prefill import prefill_attention

    h, hkv, d, bs, dtype = 32, 8, 128, 16, torch.float16
    length = context + q_len
    nb = math.ceil(length / bs)
    cache = torch.randn(2, seqs * nb, bs, hkv, d, device=device, dtype=dtype)
    tables = torch.randperm(seqs * nb, device=device).view(seqs, nb).to(torch.int32)
    n = seqs * q_len
    q = torch.randn(n, h, d, device=device, dtype=dtype)
    out = torch.empty_like(q)
    qsl = torch.arange(0, n + 1, q_len, dtype=torch.int32, device=device)
    seq_lens = torch.full((seqs,), length, dtype=torch.int32, device=device)

    def run(config):
        return lambda: prefill_attention(q, cache, out, qsl, seq_lens, tables, first_seq=0,
                                         num_seqs=seqs, first_token=0, num_query_tokens=n,
                                         scale=0.1, config=config)

    by_config = {str(c): _try_ms(torch, run(c), device) for c in PREFILL_TUNE_CONFIGS}
    by_config["default"] = _try_ms(torch, run(None), device)
    return {"name": f"prefill {seqs}x{q_len} ctx{context} H{h}/{hkv} D{d} fp16",
            "ms_by_config": by_config}


def run_tuning(torch, summary: Summary, device) -> None:
    out = summary.data["tuning"] = {"decode": [], "prefill": []}
    log("tuning (median ms per config)")
    for cfg in DECODE_TUNE_SHAPES:
        res = tune_decode(torch, cfg, device)
        out["decode"].append(res)
        log(f"  {res['name']}: best {res['best_config']} "
            f"{res['ms_by_config'][res['best_config']]} ms; by config {res['ms_by_config']}; "
            f"by splits {res['ms_by_splits_with_best']} (heuristic {res['heuristic_splits']})")
        summary.write()
    for seqs, q_len, context in ((4, 2048, 0), (4, 512, 1536)):
        res = tune_prefill(torch, device, seqs=seqs, q_len=q_len, context=context)
        out["prefill"].append(res)
        log(f"  {res['name']}: {res['ms_by_config']}")
        summary.write()


def run_correctness(summary: Summary, device, dtypes, large: bool) -> bool:
    from pllm.platforms.triton.kernels import selfcheck

    log(f"correctness: {', '.join(dtypes)}{' + large shapes' if large else ''}"
        " (the first case of each dtype includes Triton compilation)")
    start = time.monotonic()
    results = selfcheck.run(dtypes, device, large=large, log=log)
    failed = [r for r in results if not r["ok"]]
    summary.data["correctness"] = {
        "passed": len(results) - len(failed), "failed": len(failed),
        "failed_cases": [f"{r['dtype']}:{r['case']}" for r in failed],
        "seconds": round(time.monotonic() - start, 1), "results": results,
    }
    summary.write()
    log(f"correctness: {len(results) - len(failed)} passed, {len(failed)} failed")
    return not failed


def run_benchmarks(torch, summary: Summary, device, benches, deadline: float, smoke: bool):
    out = {"decode": [], "prefill": [], "skipped": []}
    summary.data["benchmarks"] = out
    log("timing decode (median ms; lower is better)")
    for cfg in benches:
        if time.monotonic() > deadline:
            out["skipped"].append(f"{cfg.name}: time budget spent")
            continue
        try:
            res = bench_decode(torch, cfg, device)
            out["decode"].append(res)
            log(f"  {cfg.name:44s} splits={res['num_splits']:2d} {res['ms']} "
                f"host {res['triton_host_us_per_call']} us/call, "
                f"{res['triton_gb_per_s']} GB/s, x{res['speedup_vs_sdpa_contiguous']} vs SDPA")
        except Exception as exc:  # noqa: BLE001 (keep timing the rest)
            out["skipped"].append(f"{cfg.name}: {type(exc).__name__}: {exc}")
            log(f"  {cfg.name}: ERROR {type(exc).__name__}: {exc}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        summary.write()
    shape = {"seqs": 2, "length": 64, "dtype_name": "fp32", "h": 4, "hkv": 2, "d": 64} \
        if smoke else {"seqs": 4, "length": 2048}
    if time.monotonic() > deadline:
        out["skipped"].append("prefill: time budget spent")
    else:
        try:
            res = bench_prefill(torch, device, **shape)
            out["prefill"].append(res)
            log(f"  {res['name']:44s} {res['ms']} {res['triton_tflops']} TFLOP/s, "
                f"x{res['speedup_vs_sdpa']} vs SDPA")
        except Exception as exc:  # noqa: BLE001 (the summary records it)
            out["skipped"].append(f"prefill: {type(exc).__name__}: {exc}")
            log(f"  prefill: ERROR {type(exc).__name__}: {exc}")
    summary.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summary", help="where to write the JSON summary")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="stop starting new benchmarks after this many seconds (default 170)")
    parser.add_argument("--skip-bench", action="store_true", help="correctness only")
    parser.add_argument("--skip-correctness", action="store_true", help="timing only")
    parser.add_argument("--tune", action="store_true",
                        help="also time a grid of tile configs and split counts (about a minute)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run on the CPU under TRITON_INTERPRET=1 (tests this script)")
    args = parser.parse_args(argv)
    summary = Summary(os.path.abspath(args.summary))
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    try:
        import torch
        import triton
    except ImportError as exc:
        summary.data.update(status="error", errors=[f"needs torch and triton: {exc}"])
        summary.write()
        log(f"ERROR: needs torch and triton: {exc}")
        return 2
    if not args.smoke and not torch.cuda.is_available():
        summary.data.update(status="error", env=environment(torch, triton, torch.device("cpu")),
                            errors=[("torch.cuda.is_available() is False: no GPU or a CPU "
                                     f"build of torch ({torch.__version__})")])
        summary.write()
        log("ERROR: no CUDA device visible to torch; nothing checked")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    summary.data["env"] = environment(torch, triton, device)
    log("environment: " + json.dumps(summary.data["env"]))
    summary.write()

    ok = False
    try:
        dtypes = ["fp32"] if args.smoke else ["fp32", "fp16", "bf16"]
        ok = True
        if not args.skip_correctness:
            ok = run_correctness(summary, device, dtypes, large=not args.smoke)
        if args.tune and not args.smoke:
            run_tuning(torch, summary, device)
        if not args.skip_bench:
            benches = SMOKE_DECODE_BENCHES if args.smoke else DECODE_BENCHES
            run_benchmarks(torch, summary, device, benches, T0 + args.budget_s, args.smoke)
    except Exception:  # noqa: BLE001 (recorded in the summary: status error)
        summary.data["errors"].append(traceback.format_exc())
        summary.data["status"] = "error"
        summary.write()
        log("ERROR:\n" + traceback.format_exc())
        return 2
    summary.data["status"] = "pass" if ok else "fail"
    summary.write()
    c = summary.data.get("correctness", {"passed": 0, "failed": 0, "failed_cases": "skipped"})
    log(f"GPU CHECK {'PASS' if ok else 'FAIL'}: {c['passed']} correctness checks passed, "
        f"{c['failed']} failed {c['failed_cases'] or ''}; summary in {summary.path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
