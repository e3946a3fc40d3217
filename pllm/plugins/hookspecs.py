"""The versioned plugin API: every hook a platform plugin may implement.

A plugin is a module named by an entry point in the group ``pllm.platforms``
(built-in platforms register through pllm's own entry points, exactly like a
third-party wheel). The module declares the API version it was written for::

    from pllm.plugins.hookspecs import hookimpl

    PLLM_PLUGIN_API_VERSION = 2

    @hookimpl
    def pllm_platform():
        from my_wheel.platform import MyPlatform   # heavy imports stay lazy
        return MyPlatform

Bump :data:`PLUGIN_API_VERSION` when a hook changes incompatibly; the manager
refuses plugins declaring any other version, naming both.

Hooks are grouped by when they run. Only :class:`pllm.plugins.manager.PluginManager`
calls them; the rest of pllm goes through its typed methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pllm.core.config import EngineConfig
    from pllm.core.interfaces import Platform

PROJECT_NAME = "pllm"
PLUGIN_API_VERSION = 2
ENTRY_POINT_GROUP = "pllm.platforms"
VERSION_ATTRIBUTE = "PLLM_PLUGIN_API_VERSION"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# ---- discovery: when the plugin is loaded ---------------------------------


@hookspec
def pllm_platform() -> type[Platform]:
    """Return the plugin's :class:`~pllm.core.interfaces.Platform` subclass.

    Runs once per plugin, right after its module is imported, whenever a
    :class:`~pllm.plugins.manager.PluginManager` loads plugins (``pllm
    platforms``, engine start-up). The manager calls each plugin's
    implementation on its own, so this is not first-result: every plugin
    contributes at most one platform. Return the class, not an instance, and
    import nothing heavy here; ``Platform.detect()`` decides availability.
    A plugin that only adjusts configuration may leave this hook out.
    """


# ---- configuration: after a platform is selected, before the engine builds --


@hookspec
def pllm_update_config(platform_name: str, config: EngineConfig) -> EngineConfig | None:
    """Adjust the engine configuration for the selected platform.

    Runs once per engine start, after ``--device`` selection and after the
    selected platform's own ``Platform.update_config``. Chained, not
    first-result: every plugin that implements it runs, in plugin load order
    (entry-point names sorted), and each receives the config returned by the
    one before. Return a changed copy (``dataclasses.replace``), or ``None``
    to leave it as is. ``platform_name`` is the selected platform's name, so
    a plugin can act only for its own device.
    """
