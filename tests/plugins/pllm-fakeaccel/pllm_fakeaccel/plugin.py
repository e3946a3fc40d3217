"""Entry point ``pllm.platforms: fakeaccel``."""

from __future__ import annotations

import dataclasses

from pllm.core.config import EngineConfig
from pllm.core.interfaces import Platform
from pllm.plugins import hookimpl

PLLM_PLUGIN_API_VERSION = 2


@hookimpl
def pllm_platform() -> type[Platform]:
    from pllm_fakeaccel.platform import FakeAccelPlatform

    return FakeAccelPlatform


@hookimpl
def pllm_update_config(platform_name: str, config: EngineConfig) -> EngineConfig | None:
    if platform_name != "fakeaccel":
        return None
    # The fake device "cannot capture graphs": a visible, testable policy.
    return dataclasses.replace(
        config, device=dataclasses.replace(config.device, enforce_eager=True)
    )
