"""The Triton grouped-GEMM experts (``pllm.platforms.triton.moe`` and
``kernels/moe.py``) against the reference (``pllm.testing.moe``).

* The alignment step is plain torch and is tested here directly, on CPU and
  on the meta device (which has no values, so any read back to the host
  fails: the step can be captured in a CUDA graph).
* The kernels run in a child process per (mode, dtype), this file run as a
  script (``--child``): interpreted (``TRITON_INTERPRET=1``, CPU tensors,
  fp32 and fp16; the variable only counts if it is set before triton is
  first imported, and this process stays free of triton), and compiled
  (``@pytest.mark.cuda``: the same cases plus realistic shapes, fp32, fp16
  and bf16, and a replayed CUDA graph). bf16 is not interpreted: the
  interpreter's bf16 ``tl.dot`` is wrong. Each case is reported as its own
  test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pllm.models.moe import MoEBlock, MoESpec, grouped_experts
from pllm.platforms.triton import moe as triton_moe
from pllm.platforms.triton.moe import align_block_size, max_padded_rows, triton_experts
from pllm.testing.moe import reference_experts

ROOT = Path(__file__).resolve().parents[3]
INTERPRETED_TIMEOUT_S = 150
COMPILED_TIMEOUT_S = 600
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}  # atol = rtol, outputs are O(1)


@dataclass(frozen=True)
class Case:
    """One routing. ``routing``: ``random`` (top-k of random logits),
    ``few`` (only the first ``num_used`` experts receive tokens), ``one``
    (every token on expert ``num_experts - 1`` in each slot it can),
    ``repeat`` (a token may pick one expert in several slots).
    ``tiles``: (block_m, block_n, block_k), else the heuristic."""

    name: str
    num_tokens: int
    num_experts: int
    top_k: int
    hidden: int
    inter: int
    routing: str = "random"
    num_used: int = 0
    tiles: tuple[int, int, int] | None = None
    fp32_weights: bool = False  # Mixtral's routing weights stay fp32
    strided_x: bool = False  # x a column slice of a wider tensor
    max_pairs_per_launch: int = 0  # small values force several launches


SMALL_CASES = (
    Case("t1_top1", 1, 4, 1, 40, 24),
    Case("t1_top2_decode", 1, 8, 2, 64, 32, fp32_weights=True),
    Case("t3_top2_odd_dims", 3, 4, 2, 33, 19),
    Case("t17_top2_empty_experts", 17, 8, 2, 48, 40, routing="few", num_used=3),
    Case("t64_top1_one_expert", 64, 8, 1, 40, 24, routing="one"),
    Case("t64_top2_two_experts", 64, 8, 2, 24, 20, routing="few", num_used=2),
    Case("t64_top2_random_bm32", 64, 4, 2, 40, 36, fp32_weights=True),
    Case("t17_top2_small_tiles", 17, 4, 2, 80, 45, tiles=(16, 16, 16)),
    Case("t17_top2_repeated_expert", 17, 4, 2, 24, 20, routing="repeat"),
    Case("t17_top2_chunked_strided", 17, 6, 2, 40, 24, strided_x=True,
         max_pairs_per_launch=16),
    Case("t64_top2_bm64", 64, 4, 2, 32, 28, tiles=(64, 32, 32)),
)
# Realistic shapes for a GPU, checked against grouped_experts in float64
# (itself checked against the reference in tests/models/test_moe.py).
LARGE_CASES = (
    Case("mixtral_e8_t256", 256, 8, 2, 1024, 1792, fp32_weights=True),
    Case("mixtral_e8_t1", 1, 8, 2, 1024, 1792, fp32_weights=True),
    Case("qwen3_e128_t512", 512, 128, 8, 2048, 768),
    Case("qwen3_e128_t4096_bm64", 4096, 128, 8, 1024, 384),
)
FIXED_CHECKS_GPU = ("cuda_graph_replay", "no_host_sync")
SMALL_NAMES = tuple(c.name for c in SMALL_CASES)
LARGE_NAMES = tuple(c.name for c in LARGE_CASES) + FIXED_CHECKS_GPU


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t, e, k, h, i = case.num_tokens, case.num_experts, case.top_k, case.hidden, case.inter
    x = torch.randn(t, h + 8 if case.strided_x else h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    logits = torch.randn(t, e, generator=gen)
    if case.routing == "few":
        logits[:, case.num_used:] = float("-inf")
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), k)
    if case.routing == "one":
        ids[:] = e - 1
    elif case.routing == "repeat":
        ids = torch.randint(0, e, (t, k), generator=gen)
        ids[::2, 1] = ids[::2, 0]
    weights = weights / weights.sum(-1, keepdim=True)
    x = x.to(dtype)
    if case.strided_x:
        x = x[:, 4:4 + h]
    weights = weights if case.fp32_weights else weights.to(dtype)
    return [x, w13.to(dtype), w2.to(dtype), weights, ids]


# ---- the alignment step (pure torch) -----------------------------------------

@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m",
                         [(1, 8, 2, 16), (3, 4, 1, 16), (17, 8, 2, 16), (64, 8, 2, 32),
                          (64, 128, 8, 16), (5, 3, 3, 64)])
def test_alignment_groups_every_pair_once_by_expert(num_tokens, num_experts, top_k, block_m):
    gen = torch.Generator().manual_seed(num_tokens + num_experts)
    # Only half of the experts are drawn: some receive nothing.
    ids = torch.randint(0, max(1, num_experts // 2), (num_tokens, top_k), generator=gen)
    sorted_ids, block_expert, num_padded = align_block_size(ids, num_experts, block_m)
    num_pairs = ids.numel()
    assert sorted_ids.dtype == block_expert.dtype == num_padded.dtype == torch.int32
    assert sorted_ids.numel() == max_padded_rows(num_pairs, num_experts, block_m)
    assert sorted_ids.numel() == block_expert.numel() * block_m
    assert sorted_ids.numel() <= num_pairs + num_experts * (block_m - 1) + block_m
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    want_padded = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert int(num_padded) == want_padded
    # Past the used rows: padding only, and no block has an expert.
    assert (sorted_ids[want_padded:] == num_pairs).all()
    assert (block_expert[want_padded // block_m:] == -1).all()
    real = sorted_ids[sorted_ids < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))  # each pair exactly once
    flat = ids.reshape(-1)
    seen = []
    for b in range(want_padded // block_m):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < num_pairs].long()
        assert rows.numel() > 0, "a used block holds at least one pair"
        assert (flat[rows] == block_expert[b]).all()
        assert rows.tolist() == sorted(rows.tolist())  # stable: pair order kept
        seen.append(int(block_expert[b]))
    assert seen == sorted(seen)  # experts in order, empty ones absent
    assert set(seen) == set(flat.tolist())


def test_alignment_reads_nothing_back_to_the_host():
    """Meta tensors have no values: ``.item()``, ``.tolist()`` or a size that
    depends on the data would raise. The sizes are the shape's bound."""
    ids = torch.empty(9, 2, dtype=torch.int64, device="meta")
    aligned = align_block_size(ids, 8, 16)
    assert aligned.sorted_ids.shape == (max_padded_rows(18, 8, 16),)
    assert aligned.block_expert.shape == (max_padded_rows(18, 8, 16) // 16,)
    assert aligned.num_padded.shape == (1,)


def test_max_padded_rows_bounds_decode_tightly():
    # One token, two experts: at most two padded groups, not one per expert.
    assert max_padded_rows(2, 128, 16) == 32
    assert max_padded_rows(1000, 8, 64) == -(-(1000 + 8 * 63) // 64) * 64


# ---- the platform hook (pure torch) ------------------------------------------

def _moe_model() -> torch.nn.Module:
    cfg = SimpleNamespace(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=8, intermediate_size=16)
    return torch.nn.Sequential(MoEBlock(12, MoESpec(cfg, 1)), torch.nn.Linear(12, 12),
                               MoEBlock(12, MoESpec(cfg, 1)))


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_gpu_platforms_run_moe_blocks_through_triton(platform):
    module = importlib.import_module(f"pllm.platforms.{platform}.platform")
    cls = {"cuda": "CudaPlatform", "rocm": "RocmPlatform"}[platform]
    model = _moe_model()
    assert getattr(module, cls)().prepare_model(model, None) is model
    assert [b.experts_fn for b in model if isinstance(b, MoEBlock)] == [triton_experts] * 2
    assert MoEBlock.experts_fn is grouped_experts  # per instance, the class is untouched


def test_no_tokens_launch_nothing():
    x, w13, w2, weights, ids = make_inputs(SMALL_CASES[0], torch.float16, "cpu")
    out = triton_experts(x[:0], w13, w2, weights[:0], ids[:0])
    assert out.shape == (0, x.shape[1]) and out.dtype == torch.float16
    assert align_block_size(ids[:0], 4, 16).sorted_ids.numel() == 0


def test_inputs_that_do_not_fit_are_named():
    x, w13, w2, weights, ids = make_inputs(SMALL_CASES[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="w2"):
        triton_experts(x, w13, w2[:, :, :-1], weights, ids)
    with pytest.raises(ValueError, match="one dtype"):
        triton_experts(x.half(), w13, w2, weights, ids)


# ---- the kernels, in a child process -----------------------------------------

def _check_case(case: Case, dtype_name: str, device) -> dict:
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(case, dtype, "cpu")
    tiles = None
    if case.tiles:
        from pllm.platforms.triton.kernels.moe import MoEConfig

        tiles = MoEConfig(*case.tiles)
    if case.max_pairs_per_launch:
        triton_moe.MAX_PAIRS_PER_LAUNCH = case.max_pairs_per_launch
    try:
        got = triton_experts(*[t.to(device) for t in inputs], config=tiles).cpu()
    finally:
        triton_moe.MAX_PAIRS_PER_LAUNCH = 32768
    if case in LARGE_CASES:
        on_dev = [t.to(device) for t in inputs]
        ref = grouped_experts(*[t.double() for t in on_dev[:3]], on_dev[3].double(),
                              on_dev[4]).cpu()
    else:
        ref = reference_experts(*inputs).double()
    return _compare(case.name, dtype_name, got, ref)


def _compare(name: str, dtype_name: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
    tol = TOLERANCES[dtype_name]
    err = (got.double() - ref.double()).abs()
    ok = bool((err <= tol + tol * ref.double().abs()).all()) and got.dtype == DTYPES[dtype_name]
    return {"case": name, "dtype": dtype_name, "ok": ok, "max_abs_err": float(err.max()),
            "ref_max": float(ref.abs().max())}


def _check_graph_replay(dtype_name: str, device) -> dict:
    """A CUDA graph captured once gives the right answer for a new routing
    copied into its inputs (sizes follow from the shapes only)."""
    dtype = DTYPES[dtype_name]
    case = Case("graph", 8, 8, 2, 256, 128)
    static = [t.to(device) for t in make_inputs(case, dtype, "cpu", seed=1)]
    triton_experts(*static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_experts(*static)
    fresh = make_inputs(case, dtype, "cpu", seed=2)
    for dst, src in zip(static, fresh, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    return _compare("cuda_graph_replay", dtype_name, out.cpu(), reference_experts(*fresh))


def _check_no_host_sync(dtype_name: str, device) -> dict:
    """torch raises on any synchronizing call while the debug mode is on."""
    case = Case("sync", 33, 16, 4, 128, 64)
    inputs = [t.to(device) for t in make_inputs(case, DTYPES[dtype_name], "cpu")]
    triton_experts(*inputs)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = triton_experts(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return _compare("no_host_sync", dtype_name, out.cpu(),
                    reference_experts(*[t.cpu() for t in inputs]))


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    checks = [(c.name, lambda c=c: _check_case(c, args.dtype, device)) for c in SMALL_CASES]
    if args.large:
        checks += [(c.name, lambda c=c: _check_case(c, args.dtype, device)) for c in LARGE_CASES]
        checks += [("cuda_graph_replay", lambda: _check_graph_replay(args.dtype, device)),
                   ("no_host_sync", lambda: _check_no_host_sync(args.dtype, device))]
    results = []
    for name, check in checks:
        try:
            res = check()
        except Exception as exc:  # noqa: BLE001 - a crash fails this case only
            res = {"case": name, "dtype": args.dtype, "ok": False,
                   "error": f"{type(exc).__name__}: {exc}"[:2000]}
        results.append(res)
        print("PASS" if res["ok"] else "FAIL", args.dtype, name,
              {k: res[k] for k in ("max_abs_err", "error") if k in res}, flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


_runs: dict[tuple[str, str], dict] = {}


def _child_run(mode: str, dtype: str, tmp_dir: Path) -> dict:
    """Results by case name of one child run (cached per mode and dtype)."""
    if (mode, dtype) in _runs:
        return _runs[mode, dtype]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    json_path = tmp_dir / f"moe-{mode}-{dtype}.json"
    args = ["--child", "--dtype", dtype, "--json", str(json_path)]
    if mode == "interpreted":
        env["TRITON_INTERPRET"] = "1"
        args += ["--device", "cpu"]
    else:
        env.pop("TRITON_INTERPRET", None)
        args += ["--device", "cuda", "--large"]
    timeout = INTERPRETED_TIMEOUT_S if mode == "interpreted" else COMPILED_TIMEOUT_S
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if not json_path.exists():  # crashed before finishing: fail every case with the log
        raise AssertionError(f"moe check {mode} {dtype} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    by_name = {r["case"]: r for r in json.loads(json_path.read_text())}
    _runs[mode, dtype] = {"by_name": by_name, "log": proc.stdout, "rc": proc.returncode}
    return _runs[mode, dtype]


def _assert_case(run: dict, name: str) -> None:
    assert name in run["by_name"], f"{name} missing from the child's output:\n{run['log']}"
    result = run["by_name"][name]
    assert result["ok"], f"{name} failed: {result}\n{run['log']}"


@pytest.fixture(scope="session")
def moe_check_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton-moe")


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'pllm[test]')")


@needs_triton
@pytest.mark.parametrize("name", SMALL_NAMES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_interpreted(dtype: str, name: str, moe_check_dir: Path) -> None:
    _assert_case(_child_run("interpreted", dtype, moe_check_dir), name)


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_interpreted_run_is_complete(dtype: str, moe_check_dir: Path) -> None:
    run = _child_run("interpreted", dtype, moe_check_dir)
    assert set(run["by_name"]) == set(SMALL_NAMES), run["log"]
    assert run["rc"] == 0, run["log"]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs an NVIDIA GPU with a CUDA build of torch")


@pytest.mark.cuda
@needs_gpu
@needs_triton
@pytest.mark.parametrize("name", SMALL_NAMES + LARGE_NAMES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_compiled_on_gpu(dtype: str, name: str, moe_check_dir: Path) -> None:
    _assert_case(_child_run("compiled", dtype, moe_check_dir), name)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
