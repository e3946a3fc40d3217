"""Registers the Intel CPU platform through the ``pllm.platforms`` entry point
``ipex``, the same way a third-party wheel would. Import stays cheap: the
platform module is imported only when the hook runs, and
intel_extension_for_pytorch only when an engine is built on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pllm.plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from pllm.core.interfaces import Platform

PLLM_PLUGIN_API_VERSION = 2


@hookimpl
def pllm_platform() -> type[Platform]:
    from pllm.platforms.ipex.platform import IPEXPlatform

    return IPEXPlatform
