"""Fixtures for the fake accelerator in this process (see tests/fakeaccel_inprocess.py)."""

from __future__ import annotations

import fakeaccel_inprocess
import pytest


@pytest.fixture
def fakeaccel(monkeypatch: pytest.MonkeyPatch):
    """``--device fakeaccel`` works in this test; yields the platform class."""
    fakeaccel_inprocess.install(monkeypatch)
    return fakeaccel_inprocess.platform_cls()
