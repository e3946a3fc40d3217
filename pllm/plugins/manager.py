"""Discovery and selection of hardware platforms.

The core talks to :class:`PluginManager` (or :func:`get_platform`) and never
to pluggy directly. Discovery, for every entry point in ``pllm.platforms``
(filtered by ``PLLM_PLUGINS=name,name``), sorted by name::

    import module -> check PLLM_PLUGIN_API_VERSION -> register hooks
      -> pllm_platform() -> Platform subclass -> detect() -> PlatformEntry

A plugin that fails any step is kept as a refused entry (score 0, the error
as its reason) so ``pllm platforms`` shows it; selecting it by name raises
that error. Built-in platforms go through exactly the same path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from pllm.core.interfaces import Detection, Platform
from pllm.plugins import hookspecs
from pllm.plugins.errors import (
    AmbiguousPlatformError,
    PlatformUnavailableError,
    PluginAPIVersionError,
    PluginError,
    PluginHookError,
    PluginLoadError,
    UnknownDeviceError,
    UnknownPluginError,
)
from pllm.plugins.records import PlatformEntry, PluginOrigin

if TYPE_CHECKING:
    from pllm.core.config import EngineConfig

logger = logging.getLogger(__name__)

ALLOW_ENV = "PLLM_PLUGINS"
AUTO = "auto"


class PluginManager:
    """Loads platform plugins, runs their detection, selects one, and calls
    the configuration hooks. Loading is lazy and happens once per instance.

    ``entry_points`` replaces the installed ones (tests, embedding); ``allow``
    replaces the ``PLLM_PLUGINS`` allow-list (``None`` reads the variable).
    """

    def __init__(
        self,
        entry_points: Iterable[EntryPoint] | None = None,
        allow: Iterable[str] | None = None,
    ) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._entry_points = None if entry_points is None else list(entry_points)
        self._allow = _parse_allow(os.environ.get(ALLOW_ENV, "")) if allow is None else list(allow)
        self._modules: dict[str, Any] = {}  # plugin name -> module, in load order
        self._entries: dict[str, PlatformEntry] = {}  # plugin name -> entry
        self._loaded = False

    # ---- discovery ---------------------------------------------------------

    def load(self) -> None:
        """Import every allowed entry point once. Raises :class:`UnknownPluginError`
        when ``PLLM_PLUGINS`` names a plugin that is not installed."""
        if self._loaded:
            return
        self._loaded = True
        found = self._entry_points
        if found is None:
            found = list(entry_points(group=hookspecs.ENTRY_POINT_GROUP))
        found = sorted(found, key=lambda ep: ep.name)
        if self._allow:
            installed = sorted({ep.name for ep in found})
            unknown = [name for name in self._allow if name not in installed]
            if unknown:
                raise UnknownPluginError(
                    f"{ALLOW_ENV} names {', '.join(map(repr, unknown))}, not installed; "
                    f"installed plugins: {', '.join(installed) or 'none'}"
                )
            found = [ep for ep in found if ep.name in self._allow]
        for ep in found:
            self._load_entry_point(ep)

    def register(
        self, module: Any, name: str, origin: PluginOrigin | None = None
    ) -> PlatformEntry | None:
        """Register one plugin module under ``name`` and detect its platform.

        Returns its entry, or ``None`` for a plugin without ``pllm_platform``.
        Raises :class:`PluginAPIVersionError` for a version mismatch and
        :class:`PluginLoadError` / :class:`PluginHookError` for a bad plugin;
        nothing is registered in that case.
        """
        origin = origin or PluginOrigin()
        if name in self._modules or name in self._entries:
            raise PluginLoadError(f"plugin name {name!r} ({origin}) is already registered")
        _check_api_version(module, name, origin)
        try:
            self._pm.register(module, name=name)
            self._pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self._pm.is_registered(module):
                self._pm.unregister(module)
            raise PluginLoadError(f"plugin {name!r} ({origin}): {exc}") from exc
        try:
            entry = self._platform_entry(module, name, origin)
        except PluginError:
            self._pm.unregister(module)
            raise
        self._modules[name] = module
        if entry is not None:
            self._entries[name] = entry
        return entry

    def platforms(self) -> list[PlatformEntry]:
        """Every discovered platform, refused ones included, best score first."""
        self.load()
        return sorted(self._entries.values(), key=lambda e: (-e.detection.score, e.name))

    # ---- selection ---------------------------------------------------------

    def resolve(self, device: str = AUTO) -> PlatformEntry:
        """The entry ``--device device`` selects, or a typed error saying why none."""
        entries = self.platforms()
        wanted = device.strip().lower() if isinstance(device, str) else device
        if wanted == AUTO:
            return _pick_best(entries)
        matches = [e for e in entries if e.name == wanted]
        if not matches:
            raise UnknownDeviceError(f"unknown device {device!r}; installed: {_listing(entries)}")
        entry = matches[0]
        if entry.error is not None:
            raise type(entry.error)(str(entry.error))
        if not entry.detection.available:
            raise PlatformUnavailableError(
                f"device {entry.name!r} ({entry.origin}) is installed but unavailable here: "
                f"{entry.detection.reason}"
            )
        return entry

    def select_platform(self, device: str = AUTO) -> Platform:
        """An instance of the platform ``device`` names (``auto``: the best score)."""
        entry = self.resolve(device)
        assert entry.platform_cls is not None  # resolve() returns usable entries only
        return entry.platform_cls()

    # ---- configuration -----------------------------------------------------

    def update_config(self, platform: Platform, config: EngineConfig) -> EngineConfig:
        """Apply ``platform.update_config`` and then every plugin's
        ``pllm_update_config``, chained in load order (see the hookspec)."""
        from pllm.core.config import EngineConfig

        self.load()
        config = platform.update_config(config)
        if not isinstance(config, EngineConfig):
            raise PluginHookError(
                f"{type(platform).__name__}.update_config returned {config!r}, not an EngineConfig"
            )
        for name, module in self._modules.items():
            for result in self._call_one(
                "pllm_update_config", module, platform_name=platform.name, config=config
            ):
                if result is None:
                    continue
                if not isinstance(result, EngineConfig):
                    raise PluginHookError(
                        f"plugin {name!r}: pllm_update_config returned {result!r}, "
                        "expected an EngineConfig or None"
                    )
                config = result
        return config

    # ---- internals ---------------------------------------------------------

    def _load_entry_point(self, ep: EntryPoint) -> None:
        origin = PluginOrigin.of(ep)
        name = ep.name if ep.name not in self._entries else f"{ep.name} ({origin})"
        module = None
        try:
            module = ep.load()
            self.register(module, name, origin)
        except PluginError as exc:
            self._refuse(name, origin, module, exc)
        except Exception as exc:  # import-time failure of a third-party module
            err = PluginLoadError(
                f"plugin {ep.name!r} ({origin}): importing {ep.value} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            self._refuse(name, origin, module, err)

    def _refuse(self, name: str, origin: PluginOrigin, module: Any, err: PluginError) -> None:
        logger.warning("refused pllm plugin %s: %s", name, err)
        self._entries[name] = PlatformEntry(
            name=name,
            plugin=name,
            origin=origin,
            api_version=_declared_version(module),
            detection=Detection(0, str(err)),
            error=err,
        )

    def _platform_entry(self, module: Any, name: str, origin: PluginOrigin) -> PlatformEntry | None:
        try:
            results = self._call_one("pllm_platform", module)
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {name!r} ({origin}): pllm_platform() raised {type(exc).__name__}: {exc}"
            ) from exc
        if not results:
            return None
        cls = results[0]
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            raise PluginHookError(
                f"plugin {name!r} ({origin}): pllm_platform() returned {cls!r}, "
                "expected a Platform subclass"
            )
        platform_name = getattr(cls, "name", None)
        if not isinstance(platform_name, str) or not platform_name or platform_name == AUTO:
            raise PluginHookError(
                f"plugin {name!r} ({origin}): {cls.__name__}.name is {platform_name!r}; "
                f"it must be a non-empty string other than {AUTO!r}"
            )
        for other in self._entries.values():
            if other.name == platform_name:
                raise PluginLoadError(
                    f"plugin {name!r} ({origin}) provides platform {platform_name!r}, "
                    f"already provided by plugin {other.plugin!r} ({other.origin})"
                )
        return PlatformEntry(
            name=platform_name,
            plugin=name,
            origin=origin,
            api_version=_declared_version(module),
            detection=_detect(cls),
            platform_cls=cls,
        )

    def _call_one(self, hook_name: str, module: Any, **kwargs: Any) -> list[Any]:
        """Call one plugin's implementation of a hook (pluggy calls all at once)."""
        others = [p for p in self._pm.get_plugins() if p is not module]
        return self._pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)


def get_platform(device: str = AUTO) -> Platform:
    """The platform ``device`` selects among the installed plugins
    (``auto``: the highest detection score). Raises the errors of
    :meth:`PluginManager.resolve`."""
    return PluginManager().select_platform(device)


def _check_api_version(module: Any, name: str, origin: PluginOrigin) -> None:
    declared = _declared_version(module)
    if declared == hookspecs.PLUGIN_API_VERSION:
        return
    from pllm import __version__

    stated = (
        f"declares {hookspecs.VERSION_ATTRIBUTE} = {declared}"
        if declared is not None
        else f"declares no {hookspecs.VERSION_ATTRIBUTE}"
    )
    raise PluginAPIVersionError(
        f"plugin {name!r} ({origin}) {stated}, but pllm {__version__} implements plugin "
        f"API version {hookspecs.PLUGIN_API_VERSION}; install a release of the plugin "
        f"built for API version {hookspecs.PLUGIN_API_VERSION}"
    )


def _declared_version(module: Any) -> int | None:
    version = getattr(module, hookspecs.VERSION_ATTRIBUTE, None)
    return version if type(version) is int else None


def _detect(cls: type[Platform]) -> Detection:
    """``cls.detect()``; an exception becomes score 0 with its text as the reason."""
    try:
        result = cls.detect()
    except Exception as exc:
        logger.warning("%s.detect() raised", cls.__name__, exc_info=True)
        return Detection(0, f"detect() raised {type(exc).__name__}: {exc}")
    if not isinstance(result, Detection):
        return Detection(0, f"detect() returned {result!r}, not a Detection")
    return result


def _pick_best(entries: list[PlatformEntry]) -> PlatformEntry:
    available = [e for e in entries if e.available]
    if not available:
        raise PlatformUnavailableError(f"no platform is available here; {_listing(entries)}")
    top = available[0].detection.score
    best = [e for e in available if e.detection.score == top]
    if len(best) > 1:
        names = [f"{e.name!r} ({e.origin})" for e in best]
        options = " or ".join(f"--device {e.name}" for e in best)
        raise AmbiguousPlatformError(
            f"--device auto is ambiguous: {', '.join(names)} "
            f"{'both' if len(best) == 2 else 'all'} score {top}; "
            f"pass {options}"
        )
    return best[0]


def _listing(entries: list[PlatformEntry]) -> str:
    return "; ".join(e.describe() for e in entries) or "no platform plugins"


def _parse_allow(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]
