"""The GPU platforms' quantized linear layers (``pllm.platforms.triton.quant``
and ``kernels/quant.py``): GGUF Q8_0 / Q4_0 / Q4_1 and int8 through the
Triton dequantizing GEMM, fp8 through ``torch._scaled_mm`` and the Triton
fp8 GEMM, each against the reference in float64.

* Plain torch, in this process: the planes hold the file's values; the
  weights move to the device with a tied head sharing the embedding's
  planes; ``torch._scaled_mm`` (which torch also runs on the CPU) against
  the fp8 reference, both ways of scaling; fp8 rounding and its choice.
* The kernels, in a child process per (mode, dtype) as in
  ``test_triton_moe.py``: interpreted (``TRITON_INTERPRET=1``, CPU
  tensors, fp32 and fp16; bf16 is left to the GPU, the interpreter's bf16
  dot being wrong), and compiled (``@pytest.mark.cuda``: fp32, fp16, bf16,
  plus realistic shapes and a replayed CUDA graph). The interpreted child
  also runs the engine with its linear layers on these kernels: greedy
  tokens equal to transformers on the same (dequantized or int8-rounded)
  weights, and fp8's equal to the engine on the torch reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pllm.models.quant import (
    FP8_MAX,
    FP8Weight,
    GGUFWeight,
    QuantEmbedding,
    QuantLinear,
    fp8_per_channel,
    int8_per_channel,
    quantize_fp8_activations,
    reference_rows,
)
from pllm.platforms.triton.quant import PlanarGGUF, gguf_rows, scaled_mm, use_triton_quant

ROOT = Path(__file__).resolve().parents[3]
INTERPRETED_TIMEOUT_S = 400
COMPILED_TIMEOUT_S = 600
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# |error| <= tol * max |reference|: the output's rounding to the dtype, plus
# fp32 accumulation over K.
TOLERANCES = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}
FORMATS = ("Q8_0", "Q4_0", "Q4_1", "int8", "fp8_token", "fp8_tensor")


def gguf_weight(fmt: str, rows: int, cols: int, seed: int = 0) -> GGUFWeight:
    """A weight quantized by the ``gguf`` package (Q8_0, Q4_0, Q4_1)."""
    import gguf

    values = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)
    data = gguf.quants.quantize(values, gguf.GGMLQuantizationType[fmt])
    return GGUFWeight.from_blocks(torch.from_numpy(np.ascontiguousarray(data)), fmt)


def make_weight(fmt: str, rows: int, cols: int, seed: int = 0):
    """The kept weight of case format ``fmt``: a GGUFWeight (Q8_0 for int8)
    or an FP8Weight."""
    if fmt in ("Q8_0", "Q4_0", "Q4_1"):
        return gguf_weight(fmt, rows, cols, seed)
    dense = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    dense *= torch.linspace(0.01, 3.0, rows)[:, None]  # rows of very different scales
    return int8_per_channel(dense) if fmt == "int8" else fp8_per_channel(dense)


# ---- plain torch -------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
def test_planes_hold_the_file_values(fmt):
    weight = gguf_weight(fmt, 24, 96)
    planar = PlanarGGUF.from_gguf(weight)
    assert planar.shape == weight.shape and planar.format == fmt
    assert planar.nbytes == weight.nbytes  # the file's bytes, rearranged
    assert torch.equal(planar.dequantize(), weight.dequantize())
    ids = torch.tensor([[5, 0], [23, 5]])
    assert torch.equal(gguf_rows(planar, ids), reference_rows(weight, ids))
    assert torch.equal(planar.narrow(7, 9).dequantize(), weight.dequantize()[7:16])


def test_planes_refuse_the_k_formats():
    from pllm.loader.testing import random_blocks

    blocks = random_blocks("Q4_K", (2, 256), np.random.default_rng(0))
    with pytest.raises(ValueError, match="takes Q8_0, Q4_0, Q4_1, not Q4_K"):
        PlanarGGUF.from_gguf(GGUFWeight.from_blocks(torch.from_numpy(blocks), "Q4_K"))


class _Tiny(nn.Module):
    """An embedding, a tied head of some of its rows, and a linear of two
    segments (Q4_1 rows, then dense rows), as a loaded model holds them."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(64, dtype=torch.float16))
        table = int8_per_channel(torch.randn(48, 64))
        self.embed = QuantEmbedding(48, 64)
        self.embed.load(table)
        self.head = QuantLinear(64, 16, bias=False)
        self.head.load(self.embed.table.narrow(0, 32, 16), share=True)
        self.proj = QuantLinear(64, 40, bias=True)
        self.proj.load([gguf_weight("Q4_1", 24, 64), torch.randn(16, 64)])
        self.fp8 = QuantLinear(64, 8, bias=False)
        self.fp8.load(fp8_per_channel(torch.randn(8, 64)))


def test_the_model_moves_to_planes_and_a_tied_head_shares_them():
    model = _Tiny()
    table = model.embed.table.dequantize()
    proj_rows = model.proj.segments[0].dequantize()
    use_triton_quant(model)
    embed, head, proj = model.embed, model.head, model.proj
    assert isinstance(embed.table, PlanarGGUF) and embed.rows is gguf_rows
    # The head's planes are the embedding's rows 32..47, not a copy.
    planes = head.segments[0]
    assert isinstance(planes, PlanarGGUF)
    assert planes.qs.data_ptr() == embed.table.qs[32].data_ptr()
    assert torch.equal(planes.dequantize(), table[32:48])
    assert isinstance(proj.segments[0], PlanarGGUF)
    assert torch.equal(proj.segments[0].dequantize(), proj_rows)
    assert proj.segments[1].dtype == torch.float16  # dense segments take the model dtype
    assert isinstance(model.fp8.segments[0], FP8Weight)
    assert head.matmul is proj.matmul is model.fp8.matmul


def test_the_bench_counts_the_bytes_of_planes_and_fp8_once():
    """``pllm bench``'s bytes read per decode step, for a model prepared as
    the GPU platforms prepare it: planes and fp8 weights by their storage,
    the tied head's view of the embedding's planes not counted twice with
    the head's own."""
    from types import SimpleNamespace

    from pllm.bench.offline import decode_weight_bytes

    model = _Tiny()
    use_triton_quant(model)
    engine = SimpleNamespace(executor=SimpleNamespace(worker=SimpleNamespace(model=model)),
                             config=SimpleNamespace(parallel=SimpleNamespace(
                                 tensor_parallel_size=1, pipeline_parallel_size=1)))
    proj, fp8 = model.proj.segments, model.fp8.segments[0]
    expected = (64 * 2  # the norm
                + model.head.segments[0].nbytes  # the head's 16 rows of the table
                + proj[0].nbytes + proj[1].numel() * 2  # planes, dense rows
                + model.proj.bias.numel() * model.proj.bias.element_size()
                + fp8.data.numel() + 4 * fp8.scale.numel())
    assert decode_weight_bytes(engine) == expected


def _fp8_reference(q: torch.Tensor, scale: torch.Tensor, weight: FP8Weight) -> torch.Tensor:
    return (q.double() @ weight.data.double().T) * scale.double() * weight.scale.double()


@pytest.mark.parametrize("per_token", [True, False])
def test_scaled_mm_matches_the_fp8_reference(per_token):
    """torch._scaled_mm as fp8_linear calls it on sm89+ (torch runs it on the
    CPU too): unscaled into fp32 with the scales after, or with the scales
    in the GEMM (bf16 output)."""
    weight = fp8_per_channel(torch.randn(48, 64))
    x = torch.randn(5, 64) * 4
    q, scale = quantize_fp8_activations(x, per_token)
    expected = _fp8_reference(q, scale, weight)
    got = scaled_mm(q, scale, weight, torch.float32, rowwise=False)
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    got = scaled_mm(q, scale, weight, torch.bfloat16, rowwise=True)
    assert got.dtype == torch.bfloat16
    assert (got.double() - expected).abs().max() <= 1e-2 * expected.abs().max()


def test_fp8_rounds_each_row_on_its_own_scale():
    w = torch.randn(4, 64) * torch.tensor([1e-3, 1.0, 300.0, 0.0])[:, None]
    q = fp8_per_channel(w)
    assert q.format == "F8_E4M3" and q.shape == (4, 64) and q.data.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.scale[:3], w.abs().amax(dim=1)[:3] / FP8_MAX)
    assert q.scale[3] == 1 and torch.equal(q.dequantize()[3], torch.zeros(64))
    # e4m3 keeps 3 mantissa bits: each value within 1/16 of itself (or of the row's scale).
    back = q.dequantize()
    assert torch.all((back - w).abs() <= w.abs() / 16 + q.scale[:, None] * 2**-9)
    assert q.dequantize()[:3].abs().amax(dim=1).allclose(w.abs().amax(dim=1)[:3])
    # Rows and columns split and join with their scales.
    top, bottom = q.split([1, 3])
    assert torch.equal(FP8Weight.cat([top, bottom]).dequantize(), back)
    assert torch.equal(q.narrow(1, 16, 32).dequantize(), back[:, 16:48])


def test_activations_quantize_per_token_or_per_tensor():
    x = torch.randn(3, 64) * torch.tensor([0.01, 1.0, 100.0])[:, None]
    x[1] = 0
    q, scale = quantize_fp8_activations(x, per_token=True)
    assert scale.shape == (3, 1) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(q[1].float(), torch.zeros(64))  # a zero row stays zero, no NaN
    assert q.float().abs().amax(dim=1)[[0, 2]].eq(FP8_MAX).all()  # each row uses the full range
    q, scale = quantize_fp8_activations(x, per_token=False)
    assert scale.shape == (1, 1) and scale.item() == pytest.approx(x.abs().max().item() / FP8_MAX)
    # An empty step, and a column-major x: rows of K contiguous values come out.
    for per_token in (True, False):
        q, scale = quantize_fp8_activations(torch.zeros(0, 64), per_token)
        assert q.shape == (0, 64) and scale.shape[1] == 1
    q, _ = quantize_fp8_activations(torch.randn(64, 5).T, per_token=True)
    assert q.stride() == (64, 1)


def test_fp8_is_refused_where_the_platform_does_not_multiply_it(tmp_path):
    from types import SimpleNamespace

    from pllm import LLM
    from pllm.core.interfaces import PlatformCapabilities
    from pllm.core.resolve import quantized_dtype, resolve_quantization
    from pllm.loader.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match=r"quantization='fp8' stores weights as fp8 e4m3 .* "
                                         r"which cpu does not multiply \(it multiplies: Q8_0"):
        LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="fp8")
    gpu = SimpleNamespace(name="gpu", capabilities=PlatformCapabilities(
        dtypes=(torch.bfloat16, torch.float32), default_dtype=torch.bfloat16,
        weight_formats=("Q8_0", "F8_E4M3"), weight_format_dtypes=(torch.bfloat16, torch.float32)))
    info = SimpleNamespace(weight_formats=())
    assert resolve_quantization("fp8", "auto", info, gpu) == "fp8"
    assert resolve_quantization("int8", "float32", info, gpu) == "int8"
    assert quantized_dtype("auto", gpu) == torch.bfloat16  # the GPU default, not fp32
    with pytest.raises(ValueError, match="gpu's kernels multiply with bfloat16, float32 "
                                         "activations; dtype=float16"):
        resolve_quantization("fp8", "float16", info, gpu)


# ---- the kernels, in a child process -----------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fmt: str
    m: int
    n: int
    k: int
    strided: bool = False  # x a column slice of a wider tensor


SMALL_CASES = tuple(
    Case(f"{fmt}_m{m}_n{n}_k{k}{'_strided' if strided else ''}", fmt, m, n, k, strided)
    for fmt in FORMATS
    for m, n, k, strided in ((1, 40, 96, False), (3, 65, 160, True), (17, 33, 64, False),
                             (70, 128, 96, False))
)
LARGE_CASES = tuple(
    Case(f"{fmt}_m{m}_n{n}_k{k}", fmt, m, n, k)
    for fmt in FORMATS
    for m, n, k in ((1, 4096, 4096), (8, 1024, 2048), (300, 2048, 1536), (2, 1000, 544))
)
SMALL_NAMES = [c.name for c in SMALL_CASES] + ["fp8_every_e4m3_code"]
LARGE_NAMES = [c.name for c in LARGE_CASES]
ENGINE_CASES = ("engine_Q4_0", "engine_Q4_1", "engine_Q8_0", "engine_int8", "engine_fp8")


def _linear(fmt: str, x: torch.Tensor, weight, device) -> torch.Tensor:
    """The product as the platform runs it (weights moved and repacked by
    use_triton_quant), and the float64 reference for ``x``."""
    layer = QuantLinear(weight.shape[1], weight.shape[0], bias=False)
    layer.load(weight)
    holder = nn.Module()
    holder.anchor = nn.Parameter(torch.zeros(1, dtype=x.dtype, device=device))
    holder.layer = layer
    use_triton_quant(holder)
    return layer(x)


def _reference(fmt: str, x: torch.Tensor, weight) -> torch.Tensor:
    if fmt.startswith("fp8"):
        q, scale = quantize_fp8_activations(x, per_token=fmt == "fp8_token")
        return _fp8_reference(q, scale, weight.to(x.device)).cpu()
    w = weight.dequantize(x.dtype).double()  # the kernel rounds W's values to x's dtype
    return x.double().cpu() @ w.T


def _check_case(case: Case, dtype_name: str, device) -> dict:
    dtype = DTYPES[dtype_name]
    weight = make_weight(case.fmt, case.n, case.k, seed=case.m)
    gen = torch.Generator().manual_seed(case.n)
    x = torch.randn(case.m, case.k * (2 if case.strided else 1), generator=gen)
    x = (x[:, 1:case.k + 1] if case.strided else x).to(device=device, dtype=dtype)
    os.environ["PLLM_FP8_ACTIVATIONS"] = "tensor" if case.fmt == "fp8_tensor" else "token"
    got = _linear(case.fmt, x, weight, device).cpu()
    ref = _reference(case.fmt, x, weight)
    return _compare(case.name, dtype_name, got, ref)


def _check_every_e4m3_code(dtype_name: str, device) -> dict:
    """The kernel's own e4m3 decode, every code but the two NaNs: activations
    holding each code once (one scale of 1) times the identity in e4m3, so
    that y is the decoded codes themselves; then every code against every
    code's column, against torch's decode in float64."""
    from pllm.platforms.triton.kernels.quant import fp8_matmul

    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn)
    k = codes.numel()
    eye = torch.eye(k).to(torch.float8_e4m3fn)
    one = torch.ones(1, 1)
    got = fp8_matmul(values[None].to(device), one.to(device), eye.to(device),
                     torch.ones(k, device=device), torch.float32).cpu()
    exact = bool(torch.equal(got[0], values.float()))  # -0 compares equal to 0
    shuffled = codes[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    a = torch.stack([codes, shuffled]).view(torch.float8_e4m3fn)
    w = torch.stack([shuffled, codes, codes.flip(0)]).view(torch.float8_e4m3fn)
    got2 = fp8_matmul(a.to(device), torch.tensor([[0.5], [2.0]], device=device), w.to(device),
                      torch.tensor([1.0, 0.25, 3.0], device=device), torch.float32).cpu()
    ref = (a.float().double() @ w.float().double().T) * torch.tensor([[0.5], [2.0]]).double() \
        * torch.tensor([1.0, 0.25, 3.0]).double()
    result = _compare("fp8_every_e4m3_code", "fp32", got2, ref)
    result.update(dtype=dtype_name, ok=result["ok"] and exact, decode_exact=exact)
    return result


def _compare(name: str, dtype_name: str, got: torch.Tensor, ref: torch.Tensor) -> dict:
    err = (got.double() - ref.double()).abs()
    bound = TOLERANCES[dtype_name] * float(ref.abs().max())
    ok = bool((err <= bound).all()) and got.dtype == DTYPES[dtype_name]
    return {"case": name, "dtype": dtype_name, "ok": ok, "max_abs_err": float(err.max()),
            "bound": bound}


def _check_graph_replay(dtype_name: str, device) -> dict:
    """A CUDA graph of the GGUF and the fp8 product gives the right answer
    for new activations copied into its input (no host sync inside)."""
    dtype = DTYPES[dtype_name]
    results = []
    for fmt in ("Q4_1", "fp8_token"):
        weight = make_weight(fmt, 512, 1024)
        layer_x = torch.randn(4, 1024, device=device, dtype=dtype)
        os.environ["PLLM_FP8_ACTIVATIONS"] = "token"
        layer = QuantLinear(1024, 512, bias=False)
        layer.load(weight)
        holder = nn.Module()
        holder.anchor = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        holder.layer = layer
        use_triton_quant(holder)
        layer(layer_x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(layer_x)
        fresh = torch.randn(4, 1024, device=device, dtype=dtype)
        layer_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        results.append(_compare(fmt, dtype_name, out.cpu(), _reference(fmt, fresh, weight)))
    return {"case": "cuda_graph_replay", "dtype": dtype_name, "ok": all(r["ok"] for r in results),
            "max_abs_err": max(r["max_abs_err"] for r in results)}


# -- the engine on these kernels (interpreted: the CPU platform, its linear
# layers on use_triton_quant instead of its own kernels)

ENGINE_PROMPT_LENS = (3, 18, 41)
ENGINE_MAX_NEW = 6
KERNEL_CALLS = [0]


def _engine_prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in ENGINE_PROMPT_LENS]


def _gpu_layers_on_cpu(reference: bool = False) -> None:
    """The CPU platform declaring the GPU platforms' weight formats and
    preparing the model as they do (the kernel calls counted), or with
    ``reference`` leaving the products on the torch reference."""
    from pllm.platforms.cpu import platform as cpu_platform
    from pllm.platforms.triton import quant as triton_quant
    from pllm.platforms.triton.platform import WEIGHT_FORMATS

    cpu_platform._CAPABILITIES = dataclasses.replace(
        cpu_platform._CAPABILITIES, weight_formats=WEIGHT_FORMATS)

    def counted(x, weight):
        KERNEL_CALLS[0] += 1
        if isinstance(weight, PlanarGGUF):
            return triton_quant.gguf_linear(x, weight)
        return triton_quant.fp8_linear(x, weight)

    def prepare(self, model, config):
        if reference:
            return model
        use_triton_quant(model)
        for layer in model.modules():
            if isinstance(layer, QuantLinear):
                layer.matmul = counted
        return model

    cpu_platform.CPUPlatform.prepare_model = prepare


def _greedy(llm) -> list[list[int]]:
    from pllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=ENGINE_MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids
            for o in llm.generate(_engine_prompts(), params, use_tqdm=False)]


def _check_engine(name: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from pllm import LLM
    from pllm.loader.testing import make_tiny_gguf, make_tiny_model
    from pllm.testing.e2e import hf_greedy

    what = name.removeprefix("engine_")
    KERNEL_CALLS[0] = 0
    if what in ("Q4_0", "Q4_1", "Q8_0"):
        path = make_tiny_gguf(tmp / what, "llama", quant=what)
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                  gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
        expected = hf_greedy(hf, _engine_prompts(), ENGINE_MAX_NEW)
        llm = LLM(path, device="cpu", kv_cache_memory="16MB", max_num_batched_tokens=32)
    elif what == "int8":
        folder = make_tiny_model(tmp / what, "qwen2", tie_word_embeddings=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            for param in hf.parameters():
                if param.dim() == 2:
                    param.copy_(int8_per_channel(param).dequantize())
        expected = hf_greedy(hf, _engine_prompts(), ENGINE_MAX_NEW)
        llm = LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="int8")
    else:  # fp8: activations are quantized too, so the reference is the engine on torch's
        folder = make_tiny_model(tmp / what, "llama")
        _gpu_layers_on_cpu(reference=True)
        ref_llm = LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="fp8")
        expected = _greedy(ref_llm)
        ref_llm.shutdown()
        _gpu_layers_on_cpu()
        llm = LLM(folder, device="cpu", kv_cache_memory="16MB", quantization="fp8")
    try:
        got = _greedy(llm)
    finally:
        llm.shutdown()
    ok = got == expected and KERNEL_CALLS[0] > 0
    return {"case": name, "dtype": "fp32", "ok": ok, "kernel_calls": KERNEL_CALLS[0],
            **({} if ok else {"got": got, "expected": expected})}


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--engine", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    checks = [(c.name, lambda c=c: _check_case(c, args.dtype, device)) for c in SMALL_CASES]
    checks += [("fp8_every_e4m3_code", lambda: _check_every_e4m3_code(args.dtype, device))]
    if args.large:
        checks += [(c.name, lambda c=c: _check_case(c, args.dtype, device)) for c in LARGE_CASES]
        checks += [("cuda_graph_replay", lambda: _check_graph_replay(args.dtype, device))]
    if args.engine:
        tmp = Path(args.json).parent / "engine"
        _gpu_layers_on_cpu()
        checks += [(name, lambda name=name: _check_engine(name, tmp)) for name in ENGINE_CASES]
    results = []
    for name, check in checks:
        try:
            res = check()
        except Exception as exc:  # noqa: BLE001 - a crash fails this case only
            res = {"case": name, "dtype": args.dtype, "ok": False,
                   "error": f"{type(exc).__name__}: {exc}"[:2000]}
        results.append(res)
        print("PASS" if res["ok"] else "FAIL", args.dtype, name,
              {k: v for k, v in res.items() if k not in ("case", "dtype", "ok")}, flush=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


_runs: dict[tuple[str, str], dict] = {}


def _child_run(mode: str, dtype: str, tmp_dir: Path) -> dict:
    """Results by case name of one child run (cached per mode and dtype)."""
    if (mode, dtype) in _runs:
        return _runs[mode, dtype]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    json_path = tmp_dir / f"quant-{mode}-{dtype}.json"
    args = ["--child", "--dtype", dtype, "--json", str(json_path)]
    if mode == "interpreted":
        env["TRITON_INTERPRET"] = "1"
        args += ["--device", "cpu"] + (["--engine"] if dtype == "fp32" else [])
    else:
        env.pop("TRITON_INTERPRET", None)
        args += ["--device", "cuda", "--large"]
    timeout = INTERPRETED_TIMEOUT_S if mode == "interpreted" else COMPILED_TIMEOUT_S
    proc = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if not json_path.exists():  # crashed before finishing: fail every case with the log
        raise AssertionError(f"quant check {mode} {dtype} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    by_name = {r["case"]: r for r in json.loads(json_path.read_text())}
    _runs[mode, dtype] = {"by_name": by_name, "log": proc.stdout, "rc": proc.returncode}
    return _runs[mode, dtype]


def _assert_case(run: dict, name: str) -> None:
    assert name in run["by_name"], f"{name} missing from the child's output:\n{run['log']}"
    result = run["by_name"][name]
    assert result["ok"], f"{name} failed: {result}\n{run['log']}"


@pytest.fixture(scope="session")
def quant_check_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton-quant")


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'pllm[test]')")


@needs_triton
@pytest.mark.parametrize("name", SMALL_NAMES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_interpreted(dtype: str, name: str, quant_check_dir: Path) -> None:
    _assert_case(_child_run("interpreted", dtype, quant_check_dir), name)


@needs_triton
@pytest.mark.parametrize("name", ENGINE_CASES)
def test_interpreted_engine(name: str, quant_check_dir: Path) -> None:
    _assert_case(_child_run("interpreted", "fp32", quant_check_dir), name)


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_interpreted_run_is_complete(dtype: str, quant_check_dir: Path) -> None:
    run = _child_run("interpreted", dtype, quant_check_dir)
    expected = set(SMALL_NAMES) | (set(ENGINE_CASES) if dtype == "fp32" else set())
    assert set(run["by_name"]) == expected, run["log"]
    assert run["rc"] == 0, run["log"]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs an NVIDIA GPU with a CUDA build of torch")


@pytest.mark.cuda
@needs_gpu
@needs_triton
@pytest.mark.parametrize("name", SMALL_NAMES + LARGE_NAMES + ["cuda_graph_replay"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_compiled_on_gpu(dtype: str, name: str, quant_check_dir: Path) -> None:
    _assert_case(_child_run("compiled", dtype, quant_check_dir), name)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
