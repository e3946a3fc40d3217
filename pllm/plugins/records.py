"""What the manager knows about each discovered plugin: plain data, so that
``pllm platforms`` and error messages can print it without calling hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from pllm.core.interfaces import Detection, Platform
    from pllm.plugins.errors import PluginError

_OWN_DISTRIBUTION = "pllm"


@dataclass(frozen=True)
class PluginOrigin:
    """Where a plugin came from: pllm's own distribution ("built-in"), another
    installed distribution (name and version), or neither (registered by hand)."""

    distribution: str | None = None
    version: str | None = None

    @property
    def builtin(self) -> bool:
        return self.distribution is not None and _normalize(self.distribution) == _OWN_DISTRIBUTION

    @classmethod
    def of(cls, entry_point: EntryPoint) -> PluginOrigin:
        dist = getattr(entry_point, "dist", None)
        if dist is None:
            return cls()
        return cls(distribution=dist.name, version=dist.version)

    def __str__(self) -> str:
        if self.distribution is None:
            return "unregistered"
        if self.builtin:
            return "built-in"
        return f"{self.distribution} {self.version}"


@dataclass(frozen=True)
class PlatformEntry:
    """One row of ``pllm platforms``: a loaded plugin and its detection.

    ``platform_cls`` is ``None`` when the plugin was refused (wrong API
    version, import failure); ``error`` then holds why, and ``detection``
    has score 0 with the same text as reason.
    """

    name: str  # the --device value: Platform.name, or the plugin name if refused
    plugin: str  # entry-point name
    origin: PluginOrigin
    api_version: int | None
    detection: Detection
    platform_cls: type[Platform] | None = None
    error: PluginError | None = None

    @property
    def available(self) -> bool:
        return self.platform_cls is not None and self.detection.available

    def describe(self) -> str:
        return f"{self.name} (score {self.detection.score}: {self.detection.reason})"


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
