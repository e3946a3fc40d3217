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


@pytest.fixture(scope="session")
def fake_platform():
    """The third-party fake accelerator (tests/plugins/pllm-fakeaccel: its own
    cache layout, the reference attention, no compiled kernels), discoverable
    as ``--device fakeaccel`` for the whole session; yields its class."""
    import fakeaccel_inprocess

    with pytest.MonkeyPatch.context() as mp:
        fakeaccel_inprocess.install(mp)
        yield fakeaccel_inprocess.platform_cls()


@pytest.fixture(scope="session")
def fake_llm(tiny_model_dir, fake_platform):
    """The tiny model on the fake platform: what the core's tests run on, so
    that none passes only because the CPU platform's kernels are there."""
    from pllm import LLM

    llm = LLM(tiny_model_dir, device="fakeaccel", kv_cache_memory="16MB", max_model_len=128)
    assert llm.llm_engine.platform.name == "fakeaccel"
    return llm


@pytest.fixture(scope="session")
def ray_token() -> str:
    """One token for the session: Ray keeps the first token a process used
    for every later cluster it joins."""
    import secrets

    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def ray_env(ray_token):
    """Ray's token authentication, with the session's token, for every
    process it starts (Ray 2.60 turns authentication on by default; nothing
    is read from or written to the home folder), and no cluster address from
    outside."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_token,
           "RAY_USAGE_STATS_ENABLED": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        yield env
