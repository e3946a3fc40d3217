"""``pllm platforms --check`` end to end: the fake accelerator passes, and
platforms with one deliberate bug each fail it, through the same suite
``--check`` runs (in this process: the mutants are registered on a plugin
manager by hand, never installed)."""

from __future__ import annotations

import types

import fakeaccel_inprocess
import pytest
import torch

from pllm.core.interfaces import Communicator
from pllm.entrypoints import platforms_cmd
from pllm.platforms.common.communicator import TorchDistributedCommunicator
from pllm.plugins import hookimpl, hookspecs
from pllm.testing import conformance as cf
from pllm.testing.reference import gather_kv

FakeAccel = fakeaccel_inprocess.platform_cls()
from pllm_fakeaccel.attention import FakeAccelAttentionBackend, _as_reference


def test_check_fakeaccel_passes_through_the_cli(fakeaccel, capsys) -> None:
    """The whole suite, as ``pllm platforms --check fakeaccel`` runs it."""
    code = platforms_cmd.main(["--check", "fakeaccel"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert " passed" in out and "failed" not in out
    # The tiny-model greedy parity is part of it, and ran (not skipped): the
    # fake has fp32. ``-rA`` names every test's outcome.
    code = platforms_cmd.check("fakeaccel", fakeaccel_inprocess.plugin_manager(), ["-rA", "-k",
                                                                             "greedy"])
    out = capsys.readouterr().out
    assert code == 0 and "PASSED" in out and "test_tiny_llama_greedy_matches_transformers" in out
    assert "SKIPPED" not in out, out


# ---- mutants ------------------------------------------------------------------------


class IgnoresScaleBackend(FakeAccelAttentionBackend):
    """Always uses 1/sqrt(head_dim), whatever ``scale`` it is given."""

    def forward(self, query, kv_cache, metadata, *, scale, **kw):
        return super().forward(query, kv_cache, metadata, scale=query.shape[-1] ** -0.5, **kw)


def _half_softmax_attention(half: torch.dtype):
    """The reference math with its softmax done in ``half`` precision."""

    def forward(self, query, kv_cache, metadata, *, scale, sliding_window=None,
                k_scale=1.0, v_scale=1.0):
        cache = _as_reference(kv_cache)
        group = query.shape[1] // cache.shape[3]
        out = torch.zeros_like(query)
        starts = metadata.query_start_loc_cpu
        for s in range(metadata.num_seqs):
            q = query[starts[s]: starts[s + 1]].float()
            seq_len = metadata.seq_lens_cpu[s]
            k, v = gather_kv(cache, metadata.block_tables[s], seq_len)
            k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale
            q_pos = torch.arange(seq_len - len(q), seq_len).unsqueeze(1)
            k_pos = torch.arange(seq_len).unsqueeze(0)
            allowed = k_pos <= q_pos
            if sliding_window is not None:
                allowed &= k_pos > q_pos - sliding_window
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores.to(half), dim=-1).float()  # the bug
            out[starts[s]: starts[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
        return out

    return type(f"{half}SoftmaxBackend".replace("torch.", "").title(),
                (FakeAccelAttentionBackend,), {"forward": forward})


Fp16SoftmaxBackend = _half_softmax_attention(torch.float16)
Bf16SoftmaxBackend = _half_softmax_attention(torch.bfloat16)


class NoOpCloseCommunicator(TorchDistributedCommunicator):
    def close(self) -> None:  # forgets to destroy the process group
        pass


class NoCloseCommunicator(Communicator):
    """Implements the collectives but not ``close`` (so it cannot be built)."""

    def __init__(self, rank: int, world_size: int, init_method: str) -> None:
        self.world_size = world_size

    def all_reduce(self, tensor):
        return tensor

    def all_gather(self, tensor, dim=0):
        return tensor


def _mutant(name: str, *, backend=None, communicator=None) -> types.ModuleType:
    """A plugin module whose platform is the fake with one piece replaced."""
    attrs: dict = {"name": name}
    if backend is not None:
        attrs["make_attention_backend"] = lambda self: backend()
    if communicator is not None:
        attrs["make_communicator"] = lambda self, rank, world_size, init: communicator(
            rank, world_size, init)
    platform = type(f"{name.title()}Platform", (FakeAccel,), attrs)
    module = types.ModuleType(f"pllm_{name}")
    module.PLLM_PLUGIN_API_VERSION = hookspecs.PLUGIN_API_VERSION
    module.pllm_platform = hookimpl(lambda: platform)
    module.platform = platform
    return module


def _check(name: str, module: types.ModuleType, select: str, capsys) -> str:
    """Run the suite's tests whose name contains ``select`` against the
    mutant; returns pytest's output, asserting the run failed."""
    manager = fakeaccel_inprocess.plugin_manager((module, name))
    code = platforms_cmd.check(name, manager, ["-k", select])
    out = capsys.readouterr().out
    assert code == 1, f"the suite did not fail {name} (exit {code}):\n{out}"  # 1: tests failed
    return out


def test_check_fails_a_backend_that_ignores_the_scale(capsys) -> None:
    out = _check("noscale", _mutant("noscale", backend=IgnoresScaleBackend),
                 "attention_matches_reference", capsys)
    assert "custom_scale_gqa" in out
    with pytest.raises(AssertionError, match="custom_scale_gqa"):
        cf.check_attention_backend(IgnoresScaleBackend())


@pytest.mark.parametrize("backend", [Fp16SoftmaxBackend, Bf16SoftmaxBackend],
                         ids=["fp16", "bf16"])
def test_check_fails_a_half_precision_softmax(backend, capsys) -> None:
    # The large-logit case alone fails it (NaN from fp16's overflow, a flat
    # softmax from bf16's rounding), whatever the fp32 tolerance of the others.
    out = _check("halfsoftmax", _mutant("halfsoftmax", backend=backend), "large_logits", capsys)
    assert "large_logits_gqa" in out and "1 failed" in out
    with pytest.raises(AssertionError, match="large_logits_gqa"):
        cf.check_attention_case(backend(), _case_named("large_logits_gqa"))


class IgnoresSoftCapBackend(FakeAccelAttentionBackend):
    """Takes ``soft_cap`` and attends without it."""

    def forward(self, query, kv_cache, metadata, *, soft_cap=None, **kw):
        return super().forward(query, kv_cache, metadata, **kw)


@pytest.mark.parametrize("name", ["soft_cap_mixed_gqa", "soft_cap_sliding_window_mqa"])
def test_check_fails_a_backend_that_ignores_the_soft_cap(name) -> None:
    with pytest.raises(AssertionError, match="mismatch|not close"):
        cf.check_attention_case(IgnoresSoftCapBackend(), _case_named(name))


def test_check_fails_a_communicator_whose_close_keeps_the_group(capsys) -> None:
    out = _check("leaky", _mutant("leaky", communicator=NoOpCloseCommunicator),
                 "close_then_rebuild", capsys)
    assert "close() left the torch.distributed process group initialized" in out
    import torch.distributed as dist

    assert not dist.is_initialized()  # the check cleaned up after the mutant


def test_check_fails_a_communicator_without_close(capsys) -> None:
    out = _check("noclose", _mutant("noclose", communicator=NoCloseCommunicator),
                 "close_then_rebuild", capsys)
    assert "make_communicator(0, 1, ...) failed" in out and "abstract" in out


def _case_named(name: str) -> cf.AttentionCase:
    return next(c for c in cf.DEFAULT_CASES if c.name == name)
