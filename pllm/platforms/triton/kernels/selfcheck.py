"""Self-check of the Triton PagedAttention backend against the reference.

Shared by ``tests/platforms/triton/test_triton_attention.py`` (interpreted,
on CPU) and the GPU check in ``ci/`` (compiled), and runnable by hand::

    TRITON_INTERPRET=1 python -m pllm.platforms.triton.kernels.selfcheck --device cpu --dtype fp32
    python -m pllm.platforms.triton.kernels.selfcheck --device cuda --dtype bf16 --large

The cases, the batch builder (shuffled blocks, garbage in every slot), the
comparison with ``pllm.testing.reference`` and the tolerances are pllm's
one attention harness, ``pllm.testing.attention_checks``. What is Triton's
own lives here: the backend's split-KV knob (``min_partition``) and the
assertion that split-KV really ran where a case expects it; the check that
the cache holds exactly the reference's values (the Triton layout is the
reference layout); a decode batch padded as a replayed CUDA graph sees it;
and the JSON/CLI runner.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from pllm.core.interfaces import AttentionMetadata
from pllm.core.kv_cache.fp8 import dequantize, is_fp8
from pllm.testing import attention_checks as ac
from pllm.testing import cache_checks
from pllm.testing.reference import reference_attention

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case(ac.AttentionCase):
    """A shared :class:`~pllm.testing.attention_checks.AttentionCase` plus the
    Triton backend's knob: small ``min_partition`` values force split-KV,
    and ``expect_split`` asserts the decodes went through split-KV + reduce."""

    min_partition: int = 256
    expect_split: bool = False


def _c(name: str, **fields) -> Case:
    return Case.from_lengths(name, **fields)


SMALL_CASES = (
    _c("decode_block_edges", decode_lens=(1, 15, 16, 17, 32, 33), num_kv_heads=4),
    _c("prefill_only_causal", prefills=((1, 1), (16, 16), (31, 31), (70, 70))),
    _c("mixed_gqa_bs32_d128", decode_lens=(5, 32, 48),
       prefills=((7, 40), (20, 20), (33, 65), (1, 64)),
       num_heads=8, num_kv_heads=2, head_dim=128, block_size=32),
    _c("mqa_mixed", decode_lens=(9, 64), prefills=((17, 50), (32, 32)),
       num_heads=4, num_kv_heads=1),
    _c("sliding_window", decode_lens=(100, 10), prefills=((40, 100), (25, 25)),
       sliding_window=24),
    _c("split_decode", decode_lens=(200, 77, 513, 3), min_partition=32, expect_split=True),
    _c("split_decode_window", decode_lens=(300, 40), sliding_window=130, min_partition=32,
       block_size=32, expect_split=True),
    _c("long_decode_default_split", decode_lens=(1100,), num_heads=2, num_kv_heads=1,
       expect_split=True),
    _c("fused_qkv_views", decode_lens=(21,), prefills=((12, 30),), fused_qkv=True),
    _c("head_dim_256", decode_lens=(40,), prefills=((18, 35),), num_heads=2,
       num_kv_heads=1, head_dim=256, block_size=32),
    # Not a power of two: padded to 128 inside the kernels.
    _c("head_dim_80_one_token_chunks", prefills=((1, 40), (1, 17)), num_heads=2,
       num_kv_heads=1, head_dim=80),
    _c("fp8_e4m3_mixed_gqa", decode_lens=(5, 33), prefills=((7, 40), (20, 20)),
       num_heads=8, num_kv_heads=2, kv_cache_dtype="float8_e4m3fn", k_scale=0.5, v_scale=2.0),
    _c("fp8_e5m2_split_window", decode_lens=(300, 40), sliding_window=130, min_partition=32,
       block_size=32, expect_split=True, kv_cache_dtype="float8_e5m2", k_scale=2.0,
       v_scale=0.25),
    _c("fp8_e4m3fnuz_mqa", decode_lens=(9, 64), prefills=((17, 50),), num_heads=4,
       num_kv_heads=1, kv_cache_dtype="float8_e4m3fnuz", k_scale=0.25, v_scale=1.0),
    # Gemma 2: soft-capped logits, head_dim 256, local layers' window; split decode too.
    _c("soft_cap_d256_window", decode_lens=(40, 7), prefills=((18, 35),), num_heads=2,
       num_kv_heads=1, head_dim=256, block_size=32, sliding_window=16, soft_cap=1.5),
    _c("soft_cap_split_decode", decode_lens=(200, 77), prefills=((9, 30),), min_partition=32,
       expect_split=True, soft_cap=2.0, scale=0.3),
)

# Realistic shapes for a GPU (too slow for the interpreter).
LARGE_CASES = (
    _c("decode_64x2k_gqa_d128", decode_lens=tuple(2048 - 13 * i for i in range(64)),
       num_heads=32, num_kv_heads=8, head_dim=128),
    _c("decode_64x2k_gqa_d64", decode_lens=tuple(2048 - 7 * i for i in range(64)),
       num_heads=16, num_kv_heads=4, head_dim=64, block_size=32),
    _c("decode_4x16k_split", decode_lens=(16384, 9000, 12345, 700),
       num_heads=32, num_kv_heads=8, head_dim=128, expect_split=True),
    _c("mixed_32dec_4chunks_ctx2k", decode_lens=tuple(1500 + 17 * i for i in range(32)),
       prefills=((512, 2048), (512, 512), (300, 1800), (77, 2000)),
       num_heads=32, num_kv_heads=8, head_dim=128),
    _c("prefill_window_d128", decode_lens=(3000, 100), prefills=((1024, 4096),),
       num_heads=16, num_kv_heads=4, head_dim=128, sliding_window=1024),
    _c("mixed_d256_bs32", decode_lens=(1000, 2000), prefills=((256, 1024),),
       num_heads=8, num_kv_heads=1, head_dim=256, block_size=32),
    _c("fp8_e4m3_mixed_32dec_ctx2k", decode_lens=tuple(1500 + 17 * i for i in range(32)),
       prefills=((512, 2048), (300, 1800)), num_heads=32, num_kv_heads=8, head_dim=128,
       kv_cache_dtype="float8_e4m3fn", k_scale=0.5, v_scale=0.5),
    _c("soft_cap_mixed_gemma2_shapes", decode_lens=tuple(1000 + 31 * i for i in range(16)),
       prefills=((512, 1024), (200, 4000)), num_heads=8, num_kv_heads=4, head_dim=256,
       sliding_window=4096, soft_cap=50.0, scale=256 ** -0.5),
    _c("fp8_e5m2_decode_4x16k_split", decode_lens=(16384, 9000, 12345, 700),
       num_heads=32, num_kv_heads=8, head_dim=128, expect_split=True,
       kv_cache_dtype="float8_e5m2", k_scale=1.0, v_scale=1.0),
)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fp8_formats(device) -> tuple[str, ...]:
    """The 8-bit cache formats to check on ``device``: all under the
    interpreter; on a GPU, those its platform's capabilities list (OCP e4m3fn
    and e5m2 on NVIDIA sm89+, e4m3fnuz on MI300)."""
    device = torch.device(device)
    if device.type == "cpu":
        return ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz")
    from pllm.plugins.manager import get_platform  # the platform as installed, not imported

    caps = get_platform("rocm" if torch.version.hip else "cuda").capabilities
    return tuple(_name(d) for d in caps.kv_cache_dtypes)


def _cache_as_reference(run: ac.AttentionRun) -> torch.Tensor:
    """The Triton cache (the reference layout) as the fp32 values attention reads."""
    cache = run.cache.cpu()
    if not is_fp8(cache.dtype):
        return cache.float()
    scales = (run.case.k_scale, run.case.v_scale)
    return torch.stack([dequantize(cache[i], scales[i]) for i in range(2)])


def check_case(backend_cls, case: ac.AttentionCase, dtype: torch.dtype, device,
               seed: int = 0) -> dict:
    """Runs one case through the shared harness; returns a JSON-able result
    (``ok`` says whether it passed)."""
    if case.kv_cache_dtype and case.kv_cache_dtype not in fp8_formats(device):
        return {"case": case.name, "dtype": _name(dtype), "ok": True,
                "skipped": f"{case.kv_cache_dtype} is not a KV-cache format of this GPU"}
    min_partition = getattr(case, "min_partition", 256)
    expect_split = getattr(case, "expect_split", False)
    backend = backend_cls(min_partition=min_partition)
    run = ac.run_attention_case(backend, case, device=torch.device(device), dtype=dtype,
                                seed=seed)
    # Every write went through write_kv: the cache must hold exactly the
    # values the reference cache holds (garbage included).
    cache_ok = torch.equal(_cache_as_reference(run), run.ref_cache)
    problem = run.mismatch()
    splits = 0
    if run.metadata.num_decodes:
        splits = backend.num_decode_splits(run.metadata, case.num_kv_heads, run.query.device,
                                           sliding_window=case.sliding_window)
    split_ok = splits > 1 if expect_split else True
    result = {
        "case": case.name, "dtype": _name(dtype),
        "ok": cache_ok and problem is None and split_ok, "write_kv_ok": cache_ok,
        "finite": run.finite, "max_abs_err": run.max_abs_err, "atol": run.atol,
        "rtol": run.rtol, "decode_splits": splits, "split_expected": expect_split,
        "num_tokens": run.metadata.num_tokens, "num_seqs": run.metadata.num_seqs,
    }
    if problem is not None:
        result["error"] = problem[:2000]
    return result


def check_write_kv_padding(backend_cls, dtype: torch.dtype, device) -> dict:
    """Negative slots (padding rows anywhere in the batch) write nothing
    (the shared check); 3 KV heads exercise the kernel's head padding."""
    cache_checks.check_write_kv(backend_cls(), device=device, dtype=dtype, num_kv_heads=3)
    return {"case": "write_kv_padding", "dtype": _name(dtype), "ok": True}


def check_write_kv_fp8(backend_cls, dtype: torch.dtype, device) -> dict:
    """Quantizing writes into each 8-bit format (the shared check): torch's
    rounding to within one step, saturation, no inf/NaN. Reports how many
    elements were a step off (the interpreter truncates where a GPU rounds
    to nearest even)."""
    off = {name: cache_checks.check_write_kv_fp8(backend_cls(), getattr(torch, name),
                                                 device=device, dtype=dtype)
           for name in fp8_formats(device)}
    return {"case": "write_kv_fp8", "dtype": _name(dtype), "ok": True, "one_step_off": off}


def check_copy_blocks(backend_cls, dtype: torch.dtype, device) -> dict:
    cache_checks.check_copy_blocks(backend_cls(), device=device, dtype=dtype)
    return {"case": "copy_blocks", "dtype": _name(dtype), "ok": True}


def check_graph_padding(backend_cls, dtype: torch.dtype, device) -> dict:
    """A decode batch as a replayed CUDA graph sees it (``pllm.core.graphs``):
    real rows first, then padding rows (context 0, slot -1, block table of
    zeros), with the launch sized for the longest possible context, so most
    split-KV partitions are empty. Real rows must match the reference on
    the unpadded batch; padding rows must stay finite."""
    from pllm.testing.metadata import build_metadata

    gen = torch.Generator().manual_seed(11)
    bs, hkv, group, d, max_len = 16, 2, 3, 64, 512
    real = build_metadata([(5, 1), (40, 1), (130, 1)], bs, generator=gen)
    n, rows = real.num_seqs, 8
    num_blocks = int(real.block_tables.max()) + 1
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=gen).to(dtype)
    q = torch.randn(rows, hkv * group, d, generator=gen).to(dtype)
    tables = torch.zeros(rows, -(-max_len // bs), dtype=torch.int32)
    tables[:n, : real.block_tables.shape[1]] = real.block_tables
    seq_lens = torch.zeros(rows, dtype=torch.int32)
    seq_lens[:n] = real.seq_lens
    padded = AttentionMetadata(
        num_seqs=rows, num_tokens=rows, num_decodes=rows, max_query_len=1, max_seq_len=max_len,
        block_size=bs, query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
        seq_lens=seq_lens, block_tables=tables, slot_mapping=torch.full((rows,), -1),
        query_start_loc_cpu=list(range(rows + 1)), seq_lens_cpu=[max_len] * rows,
    )
    backend = backend_cls(min_partition=16)
    padded = backend.prepare_metadata(ac.metadata_to(padded, device))
    scale = d**-0.5
    out = backend.forward(q.to(device), cache.to(device), padded, scale=scale).cpu()
    # The Triton layout is the reference layout: the same cache serves both.
    ref = reference_attention(q[:n], cache, real, scale=scale)
    atol, rtol = ac.default_tolerances(dtype)
    err = (out[:n].float() - ref.float()).abs()
    close = bool((err <= atol + rtol * ref.float().abs()).all())
    splits = backend.num_decode_splits(padded, hkv, q.device)
    return {"case": "graph_padding", "dtype": _name(dtype),
            "ok": close and bool(torch.isfinite(out).all()) and splits > 1,
            "max_abs_err": float(err.max()), "decode_splits": splits}


def check_conformance(backend_cls, dtype: torch.dtype, device) -> dict:
    """pllm's shipped conformance cases (``pllm.testing.attention_checks``:
    a custom softmax scale, large logits, sliding windows, ...), and the
    quick cases over each 8-bit cache. ``min_partition=16`` makes their
    decodes split."""
    backend = backend_cls(min_partition=16)
    try:
        skipped = ac.check_attention_backend(backend, device=device, dtype=dtype)
        for name in fp8_formats(device):
            kv_dtype = getattr(torch, name)
            cache_checks.check_copy_blocks(backend, device=device, dtype=dtype,
                                           kv_cache_dtype=kv_dtype)
            ac.check_attention_backend(backend, device=device, dtype=dtype,
                                       cases=ac.QUICK_CASES, kv_cache_dtype=kv_dtype)
    except AssertionError as exc:
        return {"case": "conformance", "dtype": _name(dtype), "ok": False,
                "error": str(exc)[:2000]}
    result = {"case": "conformance", "dtype": _name(dtype), "ok": True}
    if skipped:
        result["not_for_this_dtype"] = skipped
    return result


FIXED_CHECKS = ("write_kv_padding", "write_kv_fp8", "copy_blocks", "graph_padding",
                "conformance")


def run(dtype_names, device, *, large: bool = False, only: str | None = None,
        log=print) -> list[dict]:
    """All checks for each dtype (those whose name contains ``only``, if
    given); logs one line per check and returns the results."""
    from pllm.platforms.triton.attention import TritonAttentionBackend as backend

    device = torch.device(device)
    cases = SMALL_CASES + (LARGE_CASES if large else ())
    results = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        fixed = {
            "write_kv_padding": check_write_kv_padding,
            "write_kv_fp8": check_write_kv_fp8,
            "copy_blocks": check_copy_blocks,
            "graph_padding": check_graph_padding,
            "conformance": check_conformance,
        }
        checks = [(name, lambda f=fixed[name], dt=dtype: f(backend, dt, device))
                  for name in FIXED_CHECKS]
        checks += [(c.name, lambda c=c, dt=dtype: check_case(backend, c, dt, device))
                   for c in cases]
        for name, check in checks:
            if only is not None and only not in name:
                continue
            try:
                res = check()
            except Exception as exc:  # noqa: BLE001 - a crash or a failed shared check fails this check only
                res = {"case": name, "dtype": _name(dtype), "ok": False,
                       "error": f"{type(exc).__name__}: {exc}"[:2000]}
            results.append(res)
            status = "SKIP" if "skipped" in res else "PASS" if res["ok"] else "FAIL"
            extra = {k: res[k] for k in ("max_abs_err", "decode_splits", "skipped", "error",
                                         "one_step_off")
                     if k in res}
            log(f"{status} {dtype_name:5s} {name:28s} {extra}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu (with TRITON_INTERPRET=1) or cuda")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="repeatable; default fp32 and fp16")
    parser.add_argument("--large", action="store_true", help="add the realistic GPU shapes")
    parser.add_argument("--only", help="run only cases whose name contains this")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.dtype or ["fp32", "fp16"], torch.device(args.device),
                  large=args.large, only=args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
