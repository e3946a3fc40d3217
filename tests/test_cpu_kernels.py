"""The CPU platform's two decode paths (compiled kernel and pure torch) both
match the reference attention."""

from __future__ import annotations

import shutil

import pytest

import pllm.platforms.cpu.attention as cpu_attention
from pllm.platforms.cpu.attention import CPUAttentionBackend
from pllm.platforms.cpu.kernels import paged_decode_op
from pllm.testing.conformance import check_attention_backend


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the torch path is used")
def test_compiled_decode_kernel_builds_and_matches_the_reference():
    assert paged_decode_op() is not None, "the kernel failed to build; see the warning in the log"
    check_attention_backend(CPUAttentionBackend())


def test_torch_decode_path_matches_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_attention, "paged_decode_op", lambda: None)
    check_attention_backend(CPUAttentionBackend())


@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_cpu_linear_matches_f_linear_at_every_batch_size(rows):
    import torch
    from torch import nn

    from pllm.platforms.cpu.linear import CPULinear

    torch.manual_seed(0)
    dense = nn.Linear(96, 200, bias=True)
    fast = CPULinear(dense)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the torch path is used")
def test_compiled_gemv_matches_torch():
    import torch

    from pllm.platforms.cpu.kernels import gemv_op

    torch.manual_seed(0)
    w, x = torch.randn(1001, 577), torch.randn(577)
    torch.testing.assert_close(gemv_op()(w, x), w @ x, rtol=1e-5, atol=1e-4)
