"""Self-check of the Triton PagedAttention backend against the CPU reference.

Shared by ``tests/test_triton_attention.py`` (interpreted, on CPU) and
``ci/gpu_check.py`` (compiled, on a GPU), and runnable by hand::

    TRITON_INTERPRET=1 python -m pllm.platforms.cuda.kernels.selfcheck --device cpu --dtype fp32
    python -m pllm.platforms.cuda.kernels.selfcheck --device cuda --dtype bf16 --large

Each case builds one flat batch (decodes first, then prefill chunks with
cached context) over shuffled cache blocks whose unused slots hold NaN, so a
kernel that reads outside a sequence shows up as NaN rather than as a small
error. New tokens' K/V go through ``write_kv``; the cache is compared with the
expected one before attention is compared with ``reference_attention``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import torch

from pllm.core.interfaces import AttentionMetadata
from pllm.core.kv_cache.fp8 import dequantize, quantize
from pllm.platforms.cpu.attention import reference_attention

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (atol, rtol) against the fp32 reference; 16-bit kernels round P to the
# input dtype before P @ V, as every flash kernel does.
TOLERANCES = {torch.float32: (2e-4, 2e-4), torch.float16: (4e-3, 1e-2),
              torch.bfloat16: (3e-2, 3e-2)}


@dataclass(frozen=True)
class Case:
    name: str
    decode_lens: tuple[int, ...] = ()  # seq_len of each decode (query_len 1)
    prefills: tuple[tuple[int, int], ...] = ()  # (query_len, seq_len) per chunk
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    sliding_window: int | None = None
    min_partition: int = 256  # backend knob: small values force split-KV
    expect_split: bool = False  # the decodes must go through split-KV + reduce
    fused_qkv: bool = False  # q/k/v are strided views of one [T, (H + 2 Hkv) D] tensor
    # An 8-bit cache ("float8_e4m3fn", ...): K/V drawn on its grid times the
    # scales (powers of two, so the write is exact under any rounding mode).
    kv_dtype: str | None = None
    k_scale: float = 1.0
    v_scale: float = 1.0

    def scales(self) -> dict[str, float]:
        """The scale keywords the backend gets (only with an 8-bit cache)."""
        return {"k_scale": self.k_scale, "v_scale": self.v_scale} if self.kv_dtype else {}


SMALL_CASES = (
    Case("decode_block_edges", decode_lens=(1, 15, 16, 17, 32, 33), num_kv_heads=4),
    Case("prefill_only_causal", prefills=((1, 1), (16, 16), (31, 31), (70, 70))),
    Case("mixed_gqa_bs32_d128", decode_lens=(5, 32, 48),
         prefills=((7, 40), (20, 20), (33, 65), (1, 64)),
         num_heads=8, num_kv_heads=2, head_dim=128, block_size=32),
    Case("mqa_mixed", decode_lens=(9, 64), prefills=((17, 50), (32, 32)),
         num_heads=4, num_kv_heads=1),
    Case("sliding_window", decode_lens=(100, 10), prefills=((40, 100), (25, 25)),
         sliding_window=24),
    Case("split_decode", decode_lens=(200, 77, 513, 3), min_partition=32, expect_split=True),
    Case("split_decode_window", decode_lens=(300, 40), sliding_window=130, min_partition=32,
         block_size=32, expect_split=True),
    Case("long_decode_default_split", decode_lens=(1100,), num_heads=2, num_kv_heads=1,
         expect_split=True),
    Case("fused_qkv_views", decode_lens=(21,), prefills=((12, 30),), fused_qkv=True),
    Case("head_dim_256", decode_lens=(40,), prefills=((18, 35),), num_heads=2,
         num_kv_heads=1, head_dim=256, block_size=32),
    # Not a power of two: padded to 128 inside the kernels.
    Case("head_dim_80_one_token_chunks", prefills=((1, 40), (1, 17)), num_heads=2,
         num_kv_heads=1, head_dim=80),
    Case("fp8_e4m3_mixed_gqa", decode_lens=(5, 33), prefills=((7, 40), (20, 20)),
         num_heads=8, num_kv_heads=2, kv_dtype="float8_e4m3fn", k_scale=0.5, v_scale=2.0),
    Case("fp8_e5m2_split_window", decode_lens=(300, 40), sliding_window=130, min_partition=32,
         block_size=32, expect_split=True, kv_dtype="float8_e5m2", k_scale=2.0, v_scale=0.25),
    Case("fp8_e4m3fnuz_mqa", decode_lens=(9, 64), prefills=((17, 50),), num_heads=4,
         num_kv_heads=1, kv_dtype="float8_e4m3fnuz", k_scale=0.25),
)

# Realistic shapes for a GPU (too slow for the interpreter).
LARGE_CASES = (
    Case("decode_64x2k_gqa_d128", decode_lens=tuple(2048 - 13 * i for i in range(64)),
         num_heads=32, num_kv_heads=8, head_dim=128),
    Case("decode_64x2k_gqa_d64", decode_lens=tuple(2048 - 7 * i for i in range(64)),
         num_heads=16, num_kv_heads=4, head_dim=64, block_size=32),
    Case("decode_4x16k_split", decode_lens=(16384, 9000, 12345, 700),
         num_heads=32, num_kv_heads=8, head_dim=128, expect_split=True),
    Case("mixed_32dec_4chunks_ctx2k", decode_lens=tuple(1500 + 17 * i for i in range(32)),
         prefills=((512, 2048), (512, 512), (300, 1800), (77, 2000)),
         num_heads=32, num_kv_heads=8, head_dim=128),
    Case("prefill_window_d128", decode_lens=(3000, 100), prefills=((1024, 4096),),
         num_heads=16, num_kv_heads=4, head_dim=128, sliding_window=1024),
    Case("mixed_d256_bs32", decode_lens=(1000, 2000), prefills=((256, 1024),),
         num_heads=8, num_kv_heads=1, head_dim=256, block_size=32),
    Case("fp8_e4m3_mixed_32dec_ctx2k", decode_lens=tuple(1500 + 17 * i for i in range(32)),
         prefills=((512, 2048), (300, 1800)), num_heads=32, num_kv_heads=8, head_dim=128,
         kv_dtype="float8_e4m3fn", k_scale=0.5, v_scale=0.5),
    Case("fp8_e5m2_decode_4x16k_split", decode_lens=(16384, 9000, 12345, 700),
         num_heads=32, num_kv_heads=8, head_dim=128, expect_split=True,
         kv_dtype="float8_e5m2"),
)


def build_batch(case: Case, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """Random q/k/v and a cache whose free slots hold NaN, for ``case``. Returns
    ``(query, key, value, kv_cache, expected_cache, metadata)``: ``kv_cache``
    holds the cached context only, ``key``/``value`` are the new tokens still
    to be written and ``expected_cache`` is the cache once they are."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    data_gen = torch.Generator(device=device).manual_seed(seed)  # big tensors made in place
    specs = [(1, n) for n in case.decode_lens] + list(case.prefills)
    q_lens = [q for q, _ in specs]
    seq_lens = [s for _, s in specs]
    for q, s in specs:
        if not 1 <= q <= s:
            raise ValueError(f"case {case.name}: need 1 <= query_len <= seq_len, got {(q, s)}")
    bs, h, hkv, d = case.block_size, case.num_heads, case.num_kv_heads, case.head_dim
    blocks_per_seq = [math.ceil(s / bs) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(blocks_per_seq)
    tables, all_slots, new_rows, cursor = [], [], [], 0
    for q_len, seq_len, nb in zip(q_lens, seq_lens, blocks_per_seq):
        ids = perm[cursor:cursor + nb]
        tables.append(ids + [perm[-1]] * (width - nb))  # padding points at a NaN block
        pos = torch.arange(seq_len)
        all_slots.append(torch.tensor(ids)[pos // bs] * bs + pos % bs)
        first = sum(len(x) for x in all_slots) - q_len  # this chunk's rows in the flat K/V
        new_rows.append(torch.arange(first, first + q_len))
        cursor += nb
    slots_all = torch.cat(all_slots).to(device)
    new_rows = torch.cat(new_rows).to(device)
    slot_mapping = slots_all[new_rows]
    num_tokens = sum(q_lens)

    kv = torch.randn(2, len(slots_all), hkv, d, generator=data_gen, device=device)
    q = torch.randn(num_tokens, h, d, generator=data_gen, device=device)
    cache_dtype, stored = dtype, kv.to(dtype)
    if case.kv_dtype:
        cache_dtype = getattr(torch, case.kv_dtype)
        stored = torch.stack([quantize(kv[0], case.k_scale, cache_dtype),
                              quantize(kv[1], case.v_scale, cache_dtype)])
        kv = torch.stack([dequantize(stored[0], case.k_scale), dequantize(stored[1], case.v_scale)])
    expected = torch.full((2, num_blocks, bs, hkv, d), float("nan"), dtype=cache_dtype,
                          device=device)
    expected.view(2, -1, hkv, d)[:, slots_all] = stored
    cache = expected.clone()
    cache.view(2, -1, hkv, d)[:, slot_mapping] = float("nan")  # not written yet
    key, value = kv[0, new_rows], kv[1, new_rows]
    if case.fused_qkv:
        qkv = torch.cat([q.flatten(1), key.flatten(1), value.flatten(1)], dim=1).to(dtype)
        q = qkv[:, : h * d].view(num_tokens, h, d)
        key = qkv[:, h * d:(h + hkv) * d].view(num_tokens, hkv, d)
        value = qkv[:, (h + hkv) * d:].view(num_tokens, hkv, d)
    else:
        q, key, value = q.to(dtype), key.to(dtype), value.to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        num_seqs=len(specs), num_tokens=num_tokens, num_decodes=len(case.decode_lens),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=bs,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=slot_mapping.to(torch.int64),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
    )
    return q, key, value, cache, expected, metadata


def metadata_to(metadata: AttentionMetadata, device: torch.device | str) -> AttentionMetadata:
    """A copy of ``metadata`` whose tensors live on ``device``."""
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
              for k, v in vars(metadata).items()}
    fields["extras"] = dict(metadata.extras)
    return AttentionMetadata(**fields)


def _same_cache(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float().nan_to_num(12345.0), b.float().nan_to_num(12345.0))


def fp8_formats(device) -> tuple[str, ...]:
    """The 8-bit cache formats to check on ``device``: all under the
    interpreter; on a GPU, those its platform's capabilities list (OCP e4m3fn
    and e5m2 on NVIDIA sm89+, e4m3fnuz on MI300)."""
    device = torch.device(device)
    if device.type == "cpu":
        return ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz")
    if torch.version.hip:
        from pllm.platforms.rocm.platform import rocm_capabilities

        caps = rocm_capabilities(torch.cuda.get_device_properties(device).gcnArchName)
    else:
        from pllm.platforms.cuda.platform import cuda_capabilities

        caps = cuda_capabilities(torch.cuda.get_device_capability(device))
    return tuple(str(d).removeprefix("torch.") for d in caps.kv_cache_dtypes)


def check_case(backend_cls, case: Case, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Runs one case; returns a JSON-able result (``ok`` says whether it passed)."""
    if case.kv_dtype and case.kv_dtype not in fp8_formats(device):
        return {"case": case.name, "dtype": str(dtype).replace("torch.", ""), "ok": True,
                "skipped": f"{case.kv_dtype} is not a KV-cache format of this GPU"}
    backend = backend_cls(min_partition=case.min_partition)
    q, key, value, cache, expected, metadata = build_batch(case, dtype, device, seed)
    metadata = backend.prepare_metadata(metadata)
    backend.write_kv(key, value, cache, metadata.slot_mapping, **case.scales())
    cache_ok = _same_cache(cache, expected)
    scale = 1.0 / math.sqrt(case.head_dim)
    out = backend.forward(q, cache, metadata, scale=scale, sliding_window=case.sliding_window,
                          **case.scales())
    # The reference runs on the CPU (it builds its masks there).
    ref = reference_attention(q.cpu(), expected.cpu(), metadata_to(metadata, "cpu"),
                              scale=scale, sliding_window=case.sliding_window, **case.scales())
    out = out.cpu()
    atol, rtol = TOLERANCES[dtype]
    err = (out.float() - ref.float()).abs()
    finite = bool(torch.isfinite(out).all())
    close = finite and bool((err <= atol + rtol * ref.float().abs()).all())
    splits = 0
    if metadata.num_decodes:
        splits = backend.num_decode_splits(metadata, case.num_kv_heads, q.device,
                                           sliding_window=case.sliding_window)
    split_ok = splits > 1 if case.expect_split else True
    return {
        "case": case.name, "dtype": str(dtype).replace("torch.", ""),
        "ok": cache_ok and close and split_ok, "write_kv_ok": cache_ok, "finite": finite,
        "max_abs_err": float(err.nan_to_num(float("inf")).max()), "atol": atol, "rtol": rtol,
        "decode_splits": splits, "split_expected": case.expect_split,
        "num_tokens": metadata.num_tokens, "num_seqs": metadata.num_seqs,
    }


def check_write_kv_padding(backend_cls, dtype: torch.dtype, device) -> dict:
    """Negative slots (padding rows anywhere in the batch) must write nothing."""
    gen = torch.Generator().manual_seed(7)
    num_blocks, bs, hkv, d = 6, 16, 3, 64  # 3 kv heads: exercises head padding too
    cache = torch.full((2, num_blocks, bs, hkv, d), -7.0, dtype=dtype)
    slots = torch.tensor([5, -1, 40, 17, -1, -1, 95, 0, -3])
    key = torch.randn(len(slots), hkv, d, generator=gen).to(dtype)
    value = torch.randn(len(slots), hkv, d, generator=gen).to(dtype)
    expected = cache.clone()
    real = slots >= 0
    flat = expected.view(2, -1, hkv, d)
    flat[0, slots[real]] = key[real]
    flat[1, slots[real]] = value[real]
    cache = cache.to(device)
    backend_cls().write_kv(key.to(device), value.to(device), cache, slots.to(device))
    ok = torch.equal(cache.cpu(), expected)
    return {"case": "write_kv_padding", "dtype": str(dtype).replace("torch.", ""), "ok": ok}


def check_write_kv_fp8(backend_cls, dtype: torch.dtype, device) -> dict:
    """Quantizing writes into each 8-bit format (``pllm.testing``'s check):
    torch's rounding to within one step, saturation, no inf/NaN. Reports how
    many elements were a step off (the interpreter truncates where a GPU
    rounds to nearest even)."""
    from pllm.testing.cache_checks import check_write_kv_fp8

    off = {}
    for name in fp8_formats(device):
        off[name] = check_write_kv_fp8(backend_cls(), getattr(torch, name), device=device,
                                       dtype=dtype)
    return {"case": "write_kv_fp8", "dtype": str(dtype).replace("torch.", ""), "ok": True,
            "one_step_off": off}


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
    padded = backend.prepare_metadata(metadata_to(padded, device))
    scale = 1.0 / math.sqrt(d)
    out = backend.forward(q.to(device), cache.to(device), padded, scale=scale).cpu()
    ref = reference_attention(q[:n], cache, real, scale=scale)
    atol, rtol = TOLERANCES[dtype]
    err = (out[:n].float() - ref.float()).abs()
    close = bool((err <= atol + rtol * ref.float().abs()).all())
    splits = backend.num_decode_splits(padded, hkv, q.device)
    return {"case": "graph_padding", "dtype": str(dtype).replace("torch.", ""),
            "ok": close and bool(torch.isfinite(out).all()) and splits > 1,
            "max_abs_err": float(err.max()), "decode_splits": splits}


def check_copy_blocks(backend_cls, dtype: torch.dtype, device) -> dict:
    caches = [torch.randn(2, 8, 16, 2, 64).to(dtype).to(device) for _ in range(2)]
    before = [c.clone() for c in caches]
    pairs = [(1, 5), (3, 0), (1, 7)]
    backend_cls().copy_blocks(caches, pairs)
    ok = True
    for c, b in zip(caches, before):
        want = b.clone()
        for src, dst in pairs:
            want[:, dst] = b[:, src]
        ok &= torch.equal(c, want)
    return {"case": "copy_blocks", "dtype": str(dtype).replace("torch.", ""), "ok": bool(ok)}


def check_conformance(backend_cls, dtype: torch.dtype, device) -> dict:
    """pllm's shipped conformance checks (``pllm.testing.conformance``): an
    independent metadata builder, stale garbage in every slot, write_kv with
    padding and copy_blocks, and the quick cases over each 8-bit cache.
    ``min_partition=16`` makes its decodes split."""
    dtype_name = str(dtype).replace("torch.", "")
    try:
        from pllm.testing import conformance
    except ImportError as exc:  # a tree without the conformance suite
        return {"case": "conformance", "dtype": dtype_name, "ok": True,
                "skipped": f"pllm.testing.conformance unavailable: {exc}"}
    backend = backend_cls(min_partition=16)
    try:
        conformance.check_write_kv(backend, device=device, dtype=dtype)
        conformance.check_copy_blocks(backend, device=device, dtype=dtype)
        atol, rtol = TOLERANCES[dtype]
        conformance.check_attention_backend(backend, device=device, dtype=dtype,
                                            atol=atol, rtol=rtol)
        for name in fp8_formats(device):  # 8-bit caches: quick cases, block copies
            kv_dtype = getattr(torch, name)
            conformance.check_copy_blocks(backend, device=device, dtype=dtype,
                                          kv_cache_dtype=kv_dtype)
            conformance.check_attention_backend(backend, device=device, dtype=dtype, atol=atol,
                                                rtol=rtol, cases=conformance.QUICK_CASES,
                                                kv_cache_dtype=kv_dtype)
    except AssertionError as exc:
        return {"case": "conformance", "dtype": dtype_name, "ok": False, "error": str(exc)[:2000]}
    return {"case": "conformance", "dtype": dtype_name, "ok": True}


def run(dtype_names, device, *, large: bool = False, only: str | None = None,
        log=print) -> list[dict]:
    """All checks for each dtype (those whose name contains ``only``, if
    given); logs one line per check and returns the results."""
    from pllm.platforms.cuda.attention import TritonAttentionBackend as backend

    cases = SMALL_CASES + (LARGE_CASES if large else ())
    results = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        checks = [
            ("write_kv_padding", lambda: check_write_kv_padding(backend, dtype, device)),
            ("write_kv_fp8", lambda: check_write_kv_fp8(backend, dtype, device)),
            ("copy_blocks", lambda: check_copy_blocks(backend, dtype, device)),
            ("graph_padding", lambda: check_graph_padding(backend, dtype, device)),
            ("conformance", lambda: check_conformance(backend, dtype, device)),
        ] + [(c.name, lambda c=c: check_case(backend, c, dtype, device)) for c in cases]
        for name, check in checks:
            if only is not None and only not in name:
                continue
            try:
                res = check()
            except Exception as exc:  # a crash (e.g. a compile error) fails this check only
                res = {"case": name, "dtype": str(dtype).replace("torch.", ""), "ok": False,
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

