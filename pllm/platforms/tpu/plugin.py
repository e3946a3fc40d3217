"""Registers the TPU platform through the ``pllm.platforms`` entry point ``tpu``,
the same way a third-party wheel would. Import stays cheap: the platform
module is imported only when the hook runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pllm.plugins.hookspecs import hookimpl

if TYPE_CHECKING:
    from pllm.core.interfaces import Platform

PLLM_PLUGIN_API_VERSION = 2


@hookimpl
def pllm_platform() -> type[Platform]:
    from pllm.platforms.tpu.platform import TPUPlatform

    return TPUPlatform
