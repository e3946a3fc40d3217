"""The CPU platform's compiled mixture-of-experts kernel (``csrc/moe.cpp``)
against the reference (``pllm.testing.moe``): random routings with experts
that receive no token, every token to one expert, top-k 1 to 4, one token
to 128, sizes that are not multiples of the vector width, tensor-parallel
slices of the experts, fp32 and bf16, through the tiles and through the
GEMMs; its fallback; and tiny Mixtral / Qwen2-MoE engines that run on it
and still give transformers' greedy tokens."""

from __future__ import annotations

import functools
import logging
import shutil

import pytest
import torch
from parity import hf_greedy, pllm_greedy

import pllm.platforms.cpu.moe as cpu_moe
from pllm.models.moe import MoEBlock, grouped_experts
from pllm.platforms.cpu.moe import cpu_experts, moe_op, use_cpu_moe
from pllm.testing.moe import reference_experts

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None,
                                    reason="no C++ compiler: the experts run in torch")

# Bigger than any expert's token count here: everything through the tiles.
ALL_TILES = 1 << 30
PATHS = {"tiles": ALL_TILES, "gemm": 0, "mixed": 5}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


def _experts(num_experts, hidden, inter, dtype, gen):
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    return w13.to(dtype), w2.to(dtype)


def _routing(num_tokens, num_experts, top_k, used, gen):
    """Each token's ``top_k`` distinct experts among the first ``used``
    (the others receive none), and weights summing to one."""
    ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.05
    return weights / weights.sum(-1, keepdim=True), ids


@pytest.fixture(scope="module")
def op():
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the experts run in torch")
    compiled = moe_op()
    assert compiled is not None, "the kernel failed to build; see the warning in the log"
    return compiled


@pytest.fixture(scope="module")
def portable_op():
    """The kernel with bf16 weights widened by the plain loop (hosts without
    AVX2 take it; this one would otherwise never compile it)."""
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the experts run in torch")
    return cpu_moe.build("pllm_cpu_moe_portable", ("vec.h", "moe.cpp"), ["moe_experts"],
                         defines=["PLLM_PORTABLE_BF16"]).moe_experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter", [
    (1, 4, 1, 24, 20), (1, 8, 2, 37, 19), (4, 8, 4, 64, 16), (7, 8, 2, 37, 19),
    (16, 4, 1, 13, 5), (33, 6, 3, 64, 33), (128, 8, 2, 72, 40)])
def test_compiled_experts_match_the_reference(op, num_tokens, num_experts, top_k, hidden, inter,
                                              path, dtype):
    gen = torch.Generator().manual_seed(num_tokens * 1000 + hidden)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13, w2 = _experts(num_experts, hidden, inter, dtype, gen)
    used = max(top_k, num_experts // 2)  # the other half of the experts receive no token
    weights, ids = _routing(num_tokens, num_experts, top_k, used, gen)
    got = op(x, w13, w2, weights, ids, PATHS[path])
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, reference_experts(x, w13, w2, weights, ids), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
def test_every_token_to_one_expert_and_one_expert_twice(op, path, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 29, generator=gen).to(dtype)
    w13, w2 = _experts(5, 29, 11, dtype, gen)
    cases = [(torch.full((40, 1), 3), torch.rand(40, 1, generator=gen)),
             (torch.tensor([[1, 4]] * 40), torch.rand(40, 2, generator=gen)),
             (torch.tensor([[2, 2], [0, 2]] * 20), torch.rand(40, 2, generator=gen))]
    for ids, weights in cases:
        torch.testing.assert_close(op(x, w13, w2, weights, ids, PATHS[path]),
                                   reference_experts(x, w13, w2, weights, ids), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tensor_parallel_slices(op, dtype):
    """Each rank holds a slice of every expert's intermediate dimension (gate
    rows, up rows and w2 columns alike): each rank's output is its slice's,
    and in fp32 the ranks' outputs sum to the whole layer's."""
    gen = torch.Generator().manual_seed(7)
    hidden, inter, ranks = 45, 27, 3
    x = torch.randn(9, hidden, generator=gen).to(dtype)
    w13, w2 = _experts(6, hidden, inter, dtype, gen)
    weights, ids = _routing(9, 6, 2, 4, gen)
    part = inter // ranks
    total = torch.zeros(9, hidden, dtype=torch.float64)
    for r in range(ranks):
        cols = slice(r * part, (r + 1) * part)
        w13_r = torch.cat([w13[:, cols], w13[:, inter:][:, cols]], dim=1)
        got = op(x, w13_r, w2[:, :, cols], weights, ids, 2)
        torch.testing.assert_close(got, reference_experts(x, w13_r, w2[:, :, cols], weights, ids),
                                   **TOLERANCE[dtype])
        total += got.double()
    if dtype == torch.float32:
        torch.testing.assert_close(total.float(), reference_experts(x, w13, w2, weights, ids),
                                   **TOLERANCE[dtype])


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_portable_bf16_widening_matches_the_reference(op, portable_op, weights_dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(13, 35, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(4, 35, 21, torch.bfloat16, gen)
    weights, ids = _routing(13, 4, 2, 4, gen)
    weights = weights.to(weights_dtype)  # Qwen's routers give bf16, Mixtral's fp32
    want = reference_experts(x, w13, w2, weights, ids)
    for path in PATHS.values():
        got = portable_op(x, w13, w2, weights, ids, path)
        torch.testing.assert_close(got, want, **TOLERANCE[torch.bfloat16])
        assert torch.equal(got, op(x, w13, w2, weights, ids, path))  # the same lanes, widened


def test_other_dtypes_go_to_grouped_experts():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
    w13, w2 = _experts(4, 16, 8, torch.float64, gen)
    weights, ids = _routing(6, 4, 2, 4, gen)
    torch.testing.assert_close(cpu_experts(x, w13, w2, weights, ids),
                               grouped_experts(x, w13, w2, weights, ids), rtol=0, atol=0)


@pytest.fixture
def fresh_loader(monkeypatch):
    """A fresh cached loader: the real one stays as it is."""
    monkeypatch.setattr(cpu_moe, "_module", functools.cache(cpu_moe._module.__wrapped__))
    monkeypatch.delenv(cpu_moe.DISABLE_ENV, raising=False)


def _moe_model() -> torch.nn.Module:
    spec = type("Spec", (), dict(num_experts=4, intermediate=8, shared=0, top_k=2,
                                 renormalize=True, model_type="mixtral"))()
    return torch.nn.Sequential(MoEBlock(16, spec), torch.nn.Linear(16, 16), MoEBlock(16, spec))


def test_a_failed_build_keeps_grouped_experts_and_warns_once(fresh_loader, monkeypatch, caplog):
    def build(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_moe, "build", build)
    model = _moe_model()
    with caplog.at_level(logging.WARNING, logger=cpu_moe.__name__):
        use_cpu_moe(model)
        assert moe_op() is None
    assert all(block.experts_fn is grouped_experts for block in (model[0], model[2]))
    warnings = [r.getMessage() for r in caplog.records if r.name == cpu_moe.__name__]
    assert len(warnings) == 1 and "no compiler here" in warnings[0], warnings


def test_disabled_kernels_keep_grouped_experts(fresh_loader, monkeypatch):
    monkeypatch.setenv(cpu_moe.DISABLE_ENV, "0")
    monkeypatch.setattr(cpu_moe, "build", lambda *a, **k: pytest.fail("built while disabled"))
    model = _moe_model()
    assert use_cpu_moe(model) is model
    assert all(block.experts_fn is grouped_experts for block in (model[0], model[2]))


def test_a_model_without_experts_builds_nothing(fresh_loader, monkeypatch):
    monkeypatch.setattr(cpu_moe, "build", lambda *a, **k: pytest.fail("built for a dense model"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert use_cpu_moe(model) is model


@needs_compiler
@pytest.mark.parametrize("arch,overrides", [("mixtral", dict()),
                                            ("qwen2_moe", dict(mlp_only_layers=[1]))])
def test_engine_runs_the_compiled_experts_with_transformers_tokens(arch, overrides, tmp_path,
                                                                   monkeypatch):
    """Prompts long enough for some experts to take the GEMMs in prefill,
    a batch of decode steps through the tiles: transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM

    from pllm import LLM
    from pllm.loader.testing import make_tiny_model

    folder = make_tiny_model(tmp_path, arch=arch, **overrides)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (150, 5, 23)]
    expected = hf_greedy(hf, prompts, 10)

    rows = []  # the most tokens any expert got, per call

    def counting(x, w13, w2, weights, ids, few_rows):
        rows.append(int(ids.flatten().bincount().max()))
        return compiled(x, w13, w2, weights, ids, few_rows)

    compiled = moe_op()
    monkeypatch.setattr(cpu_moe, "moe_op", lambda: counting)
    llm = LLM(folder, device="cpu", kv_cache_memory="16MB")
    blocks = [m for m in llm.llm_engine.executor.worker.model.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(block.experts_fn is cpu_experts for block in blocks)
    assert pllm_greedy(llm, prompts, 10) == expected
    assert max(rows) > cpu_moe._FEW_ROWS and min(rows) <= 3, rows  # GEMMs and tiles
