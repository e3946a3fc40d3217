"""The CPU platform loads its compiled kernels (building them the first
time) when it sets up a process, before the engine serves: a request finds
them loaded and never waits for a build."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pllm.platforms.cpu.kernels as kernels
from pllm.platforms.cpu.platform import CPUPlatform


def test_setup_process_loads_the_kernels_before_any_request(monkeypatch):
    builds = []

    def build(name, sources, functions, defines=()):
        builds.append(name)
        return SimpleNamespace(paged_decode="paged_decode")

    # A fresh cached loader over a fake build: the real one stays as it is.
    monkeypatch.setattr(kernels, "_module", functools.cache(kernels._module.__wrapped__))
    monkeypatch.setattr(kernels, "build", build)
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    platform = CPUPlatform()
    platform.setup_process(SimpleNamespace(device=SimpleNamespace(num_threads=None)), 0)
    try:
        assert builds == ["pllm_cpu_kernels"] and kernels._module.cache_info().currsize == 1
        assert kernels.paged_decode_op() == "paged_decode"  # what a request calls: the cache
        assert builds == ["pllm_cpu_kernels"] and kernels._module.cache_info().hits == 1
    finally:
        platform.teardown_process()
