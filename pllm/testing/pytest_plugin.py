"""pytest plugin (entry point ``pytest11``): the ``--pllm-platform`` option
and the ``pllm_platform`` fixture that the shipped conformance suite, and a
vendor's own tests, run against.

Loaded in every pytest session where pllm is installed, so it imports
nothing heavy at module level.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pllm.core.interfaces import Platform
    from pllm.plugins.manager import PluginManager

PLATFORM_ENV = "PLLM_CONFORMANCE_PLATFORM"

# The PluginManager the suite selects from while ``using_manager`` is active
# (``pllm platforms --check`` run in-process with a manager it was given,
# e.g. one with a plugin registered by hand); None: a fresh one, which
# discovers the installed plugins.
_manager: PluginManager | None = None


@contextlib.contextmanager
def using_manager(manager: PluginManager | None) -> Iterator[None]:
    """Select platforms from ``manager`` until the block ends."""
    global _manager
    previous, _manager = _manager, manager
    try:
        yield
    finally:
        _manager = previous


def select_platform(config: pytest.Config) -> Platform:
    """The platform under test, selected exactly as ``--device`` would select it."""
    from pllm.plugins.manager import PluginManager

    return (_manager or PluginManager()).select_platform(platform_name(config))


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
    return select_platform(request.config)
