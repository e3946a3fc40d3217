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
