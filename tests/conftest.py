"""Fixtures shared across the suite: built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from pllm.loader.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    from pllm import LLM

    return LLM(tiny_model_dir, device="cpu", kv_cache_memory="16MB", max_model_len=128)
