"""Triton PagedAttention (cuda platform, reused by rocm) against the reference.

The kernels are checked by ``pllm.platforms.triton.kernels.selfcheck`` (the
Triton-specific part; the cases, batches, reference comparison and
tolerances are pllm's one harness, ``pllm.testing.attention_checks``) in a
child process per (mode, dtype):

* interpreted: ``TRITON_INTERPRET=1`` with CPU tensors, fp32 and fp16. The
  variable only takes effect if it is set before triton is first imported,
  and another test in this pytest process may already have imported triton
  (with or without it), so the child process is the only robust way; it also
  keeps this process free of triton for the tests that run after it.
  bf16 is not checked here: the interpreter's bf16 ``tl.dot`` is wrong.
* compiled (``@pytest.mark.cuda``): the same cases plus realistic shapes, in
  fp32, fp16 and bf16, on an NVIDIA GPU.

Each case is reported as its own test; the child runs once per (mode, dtype).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Safe to import here: the selfcheck module imports triton only when it runs.
from pllm.platforms.triton.kernels.selfcheck import FIXED_CHECKS, LARGE_CASES, SMALL_CASES

ROOT = Path(__file__).resolve().parents[3]
SMALL_NAMES = FIXED_CHECKS + tuple(c.name for c in SMALL_CASES)
LARGE_NAMES = tuple(c.name for c in LARGE_CASES)
INTERPRETED_TIMEOUT_S = 150
COMPILED_TIMEOUT_S = 600

_results: dict[tuple[str, str], dict] = {}


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _selfcheck(mode: str, dtype: str, tmp_dir: Path) -> dict:
    """Results by case name of one child run (cached per mode and dtype)."""
    key = (mode, dtype)
    if key in _results:
        return _results[key]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    args = ["--dtype", dtype, "--json", str(tmp_dir / f"{mode}-{dtype}.json")]
    if mode == "interpreted":
        env["TRITON_INTERPRET"] = "1"
        args += ["--device", "cpu"]
        timeout = INTERPRETED_TIMEOUT_S
    else:
        env.pop("TRITON_INTERPRET", None)
        args += ["--device", "cuda", "--large"]
        timeout = COMPILED_TIMEOUT_S
    cmd = [sys.executable, "-m", "pllm.platforms.triton.kernels.selfcheck", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    json_path = tmp_dir / f"{mode}-{dtype}.json"
    if not json_path.exists():  # crashed before finishing: fail every case with the log
        raise AssertionError(f"selfcheck {mode} {dtype} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    by_name = {r["case"]: r for r in json.loads(json_path.read_text())}
    _results[key] = {"by_name": by_name, "log": proc.stdout, "rc": proc.returncode}
    return _results[key]


def _assert_case(run: dict, name: str) -> None:
    assert name in run["by_name"], f"{name} missing from the selfcheck output:\n{run['log']}"
    result = run["by_name"][name]
    assert result["ok"], f"{name} failed: {result}\n{run['log']}"
    if "skipped" in result:
        pytest.skip(result["skipped"])


@pytest.fixture(scope="session")
def selfcheck_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton-selfcheck")


# ---- interpreted (no GPU needed) ---------------------------------------------

needs_triton = pytest.mark.skipif(not _triton_installed(),
                                  reason="triton is not installed (pip install 'pllm[test]')")


@needs_triton
@pytest.mark.parametrize("name", SMALL_NAMES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_interpreted(dtype: str, name: str, selfcheck_dir: Path) -> None:
    _assert_case(_selfcheck("interpreted", dtype, selfcheck_dir), name)


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_interpreted_run_is_complete(dtype: str, selfcheck_dir: Path) -> None:
    """Every case ran and the child exited cleanly (no silent partial run),
    and the split-KV path really was taken where the cases ask for it."""
    run = _selfcheck("interpreted", dtype, selfcheck_dir)
    assert set(run["by_name"]) == set(SMALL_NAMES), run["log"]
    assert run["rc"] == 0, run["log"]
    split = [r for r in run["by_name"].values() if r.get("split_expected")]
    assert split and all(r["decode_splits"] > 1 for r in split)


# ---- compiled, on an NVIDIA GPU ----------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs an NVIDIA GPU with a CUDA build of torch")


@pytest.mark.cuda
@needs_gpu
@needs_triton
@pytest.mark.parametrize("name", SMALL_NAMES + LARGE_NAMES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_compiled_on_gpu(dtype: str, name: str, selfcheck_dir: Path) -> None:
    _assert_case(_selfcheck("compiled", dtype, selfcheck_dir), name)
