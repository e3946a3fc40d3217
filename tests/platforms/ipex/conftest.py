"""Tests of the ipex platform (Intel Extension for PyTorch). They need IPEX
installed with the torch release it is built for, which is not the main
environment's: the ipex leg (ci/legs/ipex.sh) runs them in its own. Where
IPEX is absent or built for another torch every test here skips, and says
why (detection reads versions; IPEX is never imported to find out)."""

from __future__ import annotations

import os

import pytest

from pllm.platforms.ipex.platform import IPEXPlatform

DETECTION = IPEXPlatform.detect()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason=f"ipex unavailable: {DETECTION.reason} (the ipex leg: "
                                   "ci/legs/ipex.sh)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.ipex)
            if not DETECTION.available:
                item.add_marker(skip)
