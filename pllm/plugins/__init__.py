"""pllm's platform plugin API: hookspecs, the manager, and its errors.

Plugin authors need :data:`hookimpl` and :data:`PLUGIN_API_VERSION`; the core
needs :func:`get_platform` and :class:`PluginManager`.
"""

from pllm.plugins.hookspecs import PLUGIN_API_VERSION, hookimpl

__all__ = ["PLUGIN_API_VERSION", "hookimpl"]
