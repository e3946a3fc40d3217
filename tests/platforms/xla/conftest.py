"""Tests of the XLA platforms on torch-xla's CPU backend (the xla leg,
ci/legs/xla.sh, runs them in an environment with torch_xla and jax). Where
torch_xla is not installed every test here skips, and says so."""

from __future__ import annotations

import importlib.util
import os

import pytest

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
NEEDS_XLA = "needs torch_xla (the xla leg: ci/legs/xla.sh)"

if HAS_TORCH_XLA:
    # Before torch_xla's runtime starts: its CPU backend, and the platforms' opt-in.
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ.setdefault("PLLM_XLA_EMULATE", "cpu")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason=NEEDS_XLA)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.xla)
            if not HAS_TORCH_XLA:
                item.add_marker(skip)
