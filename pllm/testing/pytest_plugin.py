"""pytest plugin (entry point ``pytest11``): the ``--pllm-platform`` option
and the ``pllm_platform`` fixture that the shipped conformance suite, and a
vendor's own tests, run against.

Loaded in every pytest session where pllm is installed, so it imports
nothing heavy at module level.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pllm.core.interfaces import Platform

PLATFORM_ENV = "PLLM_CONFORMANCE_PLATFORM"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pllm")
    group.addoption(
        "--pllm-platform",
        action="store",
        default=None,
        metavar="NAME",
        help=f"platform the pllm conformance suite checks (default: ${PLATFORM_ENV}, else auto)",
    )


def platform_name(config: pytest.Config) -> str:
    """``--pllm-platform``, else ``$PLLM_CONFORMANCE_PLATFORM``, else ``auto``.
    Works without this plugin registered (the option then reads as unset)."""
    option = config.getoption("--pllm-platform", default=None)
    return str(option or os.environ.get(PLATFORM_ENV) or "auto")


@pytest.fixture(scope="session")
def pllm_platform(request: pytest.FixtureRequest) -> Platform:
    """The platform under test, selected exactly as ``--device`` would select it."""
    from pllm.plugins.manager import get_platform

    return get_platform(platform_name(request.config))
