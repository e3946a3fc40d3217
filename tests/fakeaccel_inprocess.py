"""The fake accelerator plugin (tests/plugins/pllm-fakeaccel) in this
process, without pip-installing it.

* :func:`import_plugin` puts the plugin's folder on ``sys.path`` (spawned
  tensor-parallel ranks inherit it) and returns its plugin module;
* :func:`plugin_manager` is a ``PluginManager`` that knows only it;
* :func:`install` (with pytest's ``monkeypatch``) adds its entry point to
  the installed ones, so everything that discovers platforms by itself
  (``pllm.LLM(..., device="fakeaccel")``, ``get_platform``, ``pllm
  platforms``) finds it as if it were installed.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent / "plugins" / "pllm-fakeaccel"
NAME = "fakeaccel"
ENTRY_POINT = EntryPoint(name=NAME, value="pllm_fakeaccel.plugin", group="pllm.platforms")


def import_plugin():
    """The plugin module ``pllm_fakeaccel.plugin`` (its folder put on ``sys.path``)."""
    if str(PLUGIN_DIR) not in sys.path:
        sys.path.insert(0, str(PLUGIN_DIR))
    return importlib.import_module("pllm_fakeaccel.plugin")


def platform_cls():
    import_plugin()
    from pllm_fakeaccel.platform import FakeAccelPlatform

    return FakeAccelPlatform


def plugin_manager(*extra: tuple[object, str]):
    """A ``PluginManager`` with no installed plugins, the fake registered as
    ``fakeaccel``, and each ``(module, name)`` of ``extra`` after it."""
    from pllm.plugins.manager import PluginManager

    manager = PluginManager(entry_points=[], allow=[])
    manager.register(import_plugin(), NAME)
    for module, name in extra:
        manager.register(module, name)
    return manager


def install(monkeypatch) -> None:
    """Make every ``PluginManager`` (and so ``--device fakeaccel``) discover
    the fake next to the installed plugins, until ``monkeypatch`` undoes it."""
    import pllm.plugins.manager as manager_module

    import_plugin()
    installed = manager_module.entry_points

    def with_fake(**kwargs):
        found = list(installed(**kwargs))
        if kwargs.get("group") == ENTRY_POINT.group and all(ep.name != NAME for ep in found):
            found.append(ENTRY_POINT)
        return found

    monkeypatch.setattr(manager_module, "entry_points", with_fake)
