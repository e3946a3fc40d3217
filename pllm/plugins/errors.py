"""Typed errors of plugin discovery and platform selection.

Each one is something a user can cause (a typo in ``--device``, a plugin
built for another pllm, two plugins claiming the machine), so each message
names the bad value and the valid choices.
"""

from __future__ import annotations


class PluginError(Exception):
    """Base class of every error raised by pllm's plugin machinery."""


class UnknownDeviceError(PluginError, ValueError):
    """``--device NAME`` names no installed platform."""


class UnknownPluginError(PluginError, ValueError):
    """``PLLM_PLUGINS`` names a plugin that is not installed."""


class PlatformUnavailableError(PluginError, RuntimeError):
    """The platform is installed but its detection says it cannot run here."""


class AmbiguousPlatformError(PluginError, RuntimeError):
    """``--device auto`` found two or more platforms with the same top score."""


class PluginAPIVersionError(PluginError, RuntimeError):
    """A plugin was built for a different ``PLUGIN_API_VERSION``."""


class PluginLoadError(PluginError, RuntimeError):
    """A plugin module failed to import, or its hooks do not match the specs."""


class PluginHookError(PluginError, TypeError):
    """A hook implementation returned a value of the wrong type."""


class BackendNotImplementedError(PluginError, NotImplementedError):
    """The platform is detected, but pllm has no backend for it yet."""
