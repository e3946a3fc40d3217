"""The core's tests run on the fake platform (see ``fake_llm``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llm(fake_llm):
    return fake_llm
