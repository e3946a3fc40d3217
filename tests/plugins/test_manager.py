"""The plugin API and manager: discovery through entry points, version
checks, the allow-list, selection errors, the config hook chain, and a real
third-party distribution (tests/plugins/pllm-fakeaccel) installed with pip."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import shutil
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from pllm.core.config import EngineConfig
from pllm.core.interfaces import Detection
from pllm.entrypoints import platforms_cmd
from pllm.platforms.cpu.platform import CPUPlatform
from pllm.plugins import hookimpl, hookspecs
from pllm.plugins.errors import (
    AmbiguousPlatformError,
    PlatformUnavailableError,
    PluginAPIVersionError,
    PluginHookError,
    PluginLoadError,
    UnknownDeviceError,
    UnknownPluginError,
)
from pllm.plugins.manager import PluginManager, get_platform

PLUGIN_SRC = Path(__file__).parent / "pllm-fakeaccel"
GROUP = hookspecs.ENTRY_POINT_GROUP


# ---- helpers: plugin modules made on the fly --------------------------------


def make_platform(name: str, score: int = 5, error: Exception | None = None) -> type:
    def detect(cls) -> Detection:  # noqa: ANN001
        if error is not None:
            raise error
        return Detection(score, f"{name} test platform")

    return type(f"P_{name}", (CPUPlatform,), {"name": name, "detect": classmethod(detect)})


def make_plugin(platform_cls: object = None, version: object = 2, update=None) -> types.ModuleType:  # noqa: ANN001
    module = types.ModuleType("fake_plugin")
    if version is not None:
        module.PLLM_PLUGIN_API_VERSION = version
    if platform_cls is not None:
        module.pllm_platform = hookimpl(lambda: platform_cls)
    if update is not None:
        module.pllm_update_config = hookimpl(update)
    return module


def entry_points_for(
    monkeypatch: pytest.MonkeyPatch, **modules: types.ModuleType
) -> list[EntryPoint]:
    """Entry points in the pllm group resolving to ``modules`` (by name)."""
    eps = []
    for name, module in modules.items():
        mod_name = f"_pllm_test_plugin_{name}"
        monkeypatch.setitem(sys.modules, mod_name, module)
        eps.append(EntryPoint(name=name, value=mod_name, group=GROUP))
    return eps


def manager_with(monkeypatch: pytest.MonkeyPatch, **modules: types.ModuleType) -> PluginManager:
    cpu = importlib.import_module("pllm.platforms.cpu.plugin")
    return PluginManager(entry_points_for(monkeypatch, cpu=cpu, **modules), allow=[])


def run_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    platforms_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["platforms", *argv])
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


def row_of(table: str, name: str) -> str:
    rows = [line for line in table.splitlines() if line[3:].split(" ")[0] == name]
    assert len(rows) == 1, f"no single row for {name!r} in:\n{table}"
    return rows[0]


# ---- the hook API -----------------------------------------------------------


def test_every_hookspec_is_named_pllm_and_tested_here() -> None:
    specs = [n for n in dir(hookspecs) if n.startswith("pllm_")]
    assert specs == ["pllm_platform", "pllm_update_config"]
    source = Path(__file__).read_text()
    for name in specs:
        assert f"def test_hook_{name}" in source, f"hook {name} has no test_hook_{name}"
    assert hookspecs.PLUGIN_API_VERSION == 2 and hookspecs.PROJECT_NAME == "pllm"


def test_builtin_plugins_declare_the_api_version() -> None:
    for name in ("cpu", "cuda", "rocm", "tpu", "neuron"):
        module = importlib.import_module(f"pllm.platforms.{name}.plugin")
        assert module.PLLM_PLUGIN_API_VERSION == hookspecs.PLUGIN_API_VERSION


def test_hook_pllm_platform_discovers_builtins_through_entry_points() -> None:
    entries = {
        e.name: e for e in PluginManager(allow=["cpu", "cuda", "rocm", "tpu", "neuron"]).platforms()
    }
    assert set(entries) == {"cpu", "cuda", "rocm", "tpu", "neuron"}
    for entry in entries.values():
        assert entry.origin.builtin and str(entry.origin) == "built-in"
        assert entry.api_version == 2 and entry.platform_cls is not None
        assert entry.detection.reason
    assert entries["cpu"].available


def test_hook_pllm_platform_rejects_a_non_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(monkeypatch, bad=make_plugin(platform_cls=int))
    with pytest.raises(PluginHookError, match=r"'bad'.*returned <class 'int'>.*Platform subclass"):
        manager.resolve("bad")
    assert manager.resolve("auto").name == "cpu"


def test_hook_pllm_update_config_chains_in_load_order(monkeypatch: pytest.MonkeyPatch) -> None:
    def first(platform_name: str, config: EngineConfig) -> EngineConfig:
        return dataclasses.replace(
            config, scheduler=dataclasses.replace(config.scheduler, max_num_seqs=8)
        )

    def second(platform_name: str, config: EngineConfig) -> EngineConfig | None:
        if platform_name != "cpu":
            return None
        doubled = config.scheduler.max_num_seqs * 2  # sees the first plugin's result
        return dataclasses.replace(
            config, scheduler=dataclasses.replace(config.scheduler, max_num_seqs=doubled)
        )

    manager = manager_with(
        monkeypatch, a_first=make_plugin(update=first), b_second=make_plugin(update=second)
    )
    original = EngineConfig()
    updated = manager.update_config(manager.select_platform("cpu"), original)
    assert updated.scheduler.max_num_seqs == 16
    assert original.scheduler.max_num_seqs == 128  # a copy, never edited in place


def test_hook_pllm_update_config_rejects_a_wrong_type(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(monkeypatch, bad=make_plugin(update=lambda platform_name, config: {}))
    with pytest.raises(PluginHookError, match=r"'bad'.*pllm_update_config returned \{\}"):
        manager.update_config(manager.select_platform("cpu"), EngineConfig())


# ---- refusal of bad plugins -------------------------------------------------


def test_api_version_mismatch_names_plugin_and_both_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = make_plugin(make_platform("oldaccel"), version=1)  # built for the previous API
    with pytest.raises(PluginAPIVersionError) as err:
        PluginManager(entry_points=[], allow=[]).register(old, "oldaccel")
    text = str(err.value)
    assert "'oldaccel'" in text and "PLLM_PLUGIN_API_VERSION = 1" in text
    assert "plugin API version 2" in text

    manager = manager_with(monkeypatch, oldaccel=old)
    entry = {e.name: e for e in manager.platforms()}["oldaccel"]
    assert entry.detection.score == 0 and "PLLM_PLUGIN_API_VERSION = 1" in entry.detection.reason
    assert entry.api_version == 1
    with pytest.raises(PluginAPIVersionError, match="API version 2"):
        manager.select_platform("oldaccel")
    assert manager.resolve("auto").name == "cpu"  # one bad plugin does not stop the rest


def test_missing_api_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(monkeypatch, nover=make_plugin(make_platform("nover"), version=None))
    with pytest.raises(PluginAPIVersionError, match="declares no PLLM_PLUGIN_API_VERSION"):
        manager.resolve("nover")


def test_import_failure_is_listed_not_swallowed() -> None:
    manager = PluginManager([EntryPoint("broken", "no_such_module_xyz", GROUP)], allow=[])
    (entry,) = manager.platforms()
    assert entry.detection.score == 0 and "ModuleNotFoundError" in entry.detection.reason
    with pytest.raises(PluginLoadError, match="no_such_module_xyz"):
        manager.resolve("broken")


def test_duplicate_platform_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(monkeypatch, zcpu=make_plugin(make_platform("cpu")))
    entries = {e.plugin: e for e in manager.platforms()}
    assert "already provided by plugin 'cpu'" in entries["zcpu"].detection.reason
    assert isinstance(manager.select_platform("cpu"), CPUPlatform)


def test_detect_raising_gives_score_zero_with_the_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    boom = make_platform("boom", error=OSError("driver exploded"))
    manager = manager_with(monkeypatch, boom=make_plugin(boom))
    entry = {e.name: e for e in manager.platforms()}["boom"]
    assert entry.detection == Detection(0, "detect() raised OSError: driver exploded")
    with pytest.raises(PlatformUnavailableError, match="driver exploded"):
        manager.select_platform("boom")


# ---- selection ----------------------------------------------------------------


def test_auto_takes_the_highest_score(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(
        monkeypatch,
        fast=make_plugin(make_platform("fast", score=50)),
        slow=make_plugin(make_platform("slow", score=20)),
    )
    assert manager.select_platform("auto").name == "fast"
    assert manager.select_platform(" CPU ").name == "cpu"


def test_tie_names_both_and_suggests_device(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(
        monkeypatch,
        aaa=make_plugin(make_platform("aaa", score=50)),
        bbb=make_plugin(make_platform("bbb", score=50)),
    )
    with pytest.raises(AmbiguousPlatformError) as err:
        manager.select_platform()
    assert "'aaa'" in str(err.value) and "'bbb'" in str(err.value)
    assert "--device aaa or --device bbb" in str(err.value)


def test_unknown_device_lists_installed_with_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(monkeypatch, other=make_plugin(make_platform("other", score=0)))
    with pytest.raises(UnknownDeviceError) as err:
        manager.select_platform("tpuu")
    text = str(err.value)
    assert "unknown device 'tpuu'" in text
    assert (
        "cpu (score 10: always available" in text and "other (score 0: other test platform)" in text
    )
    assert isinstance(err.value, ValueError)


def test_unavailable_device_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = manager_with(monkeypatch, off=make_plugin(make_platform("off", score=0)))
    with pytest.raises(
        PlatformUnavailableError, match="'off'.*unavailable here: off test platform"
    ):
        manager.select_platform("off")


def test_no_available_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = entry_points_for(monkeypatch, off=make_plugin(make_platform("off", score=0)))
    with pytest.raises(PlatformUnavailableError, match="no platform is available"):
        PluginManager(eps, allow=[]).select_platform()


def test_allow_list_filters_and_rejects_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLLM_PLUGINS", "cpu, tpu")
    assert {e.name for e in PluginManager().platforms()} == {"cpu", "tpu"}
    monkeypatch.setenv("PLLM_PLUGINS", "cpu,nosuch")
    with pytest.raises(UnknownPluginError, match=r"'nosuch'.*installed plugins: .*cpu"):
        PluginManager().platforms()
    monkeypatch.setenv("PLLM_PLUGINS", "tpu")
    with pytest.raises(PlatformUnavailableError):
        get_platform()


def test_get_platform_selects_the_best_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` is the highest detection score among the available platforms
    (cpu on a host without accelerators; a GPU platform on a GPU host)."""
    monkeypatch.delenv("PLLM_PLUGINS", raising=False)
    available = [e for e in PluginManager().platforms() if e.available]
    best = max(available, key=lambda e: e.detection.score)
    assert get_platform().name == best.name
    assert get_platform("cpu").name == "cpu"


def test_platforms_command_lists_and_marks_selected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLLM_PLUGINS", "cpu,cuda,rocm,tpu,neuron")
    code, table = run_cli()
    assert code == 0 and table.splitlines()[0].split() == [
        "NAME",
        "ORIGIN",
        "API",
        "SCORE",
        "REASON",
    ]
    assert row_of(table, "cpu").startswith("*") and "built-in" in row_of(table, "cpu")
    assert "not a CUDA build" in row_of(table, "cuda") and not row_of(table, "cuda").startswith("*")
    code, table = run_cli("--device", "tpu")
    assert code == 1 and "no platform selected for --device tpu" in table
    assert not any(line.startswith("*") for line in table.splitlines())


# ---- a real third-party distribution ---------------------------------------------


@pytest.fixture(scope="session")
def fakeaccel(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """pip-installs tests/plugins/pllm-fakeaccel (from a copy, so the build
    leaves nothing in the source tree) and uninstalls it afterwards."""
    src = tmp_path_factory.mktemp("fakeaccel") / "pllm-fakeaccel"
    shutil.copytree(PLUGIN_SRC, src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", str(src)], check=True)
    importlib.invalidate_caches()
    try:
        yield "fakeaccel"
    finally:
        subprocess.run([*pip, "uninstall", "-y", "pllm-fakeaccel"], check=True)
        importlib.invalidate_caches()


def test_fakeaccel_is_listed_with_its_distribution(
    fakeaccel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PLLM_PLUGINS", raising=False)
    code, table = run_cli()
    row = row_of(table, "fakeaccel")
    assert code == 0 and "pllm-fakeaccel 0.3.1" in row and row.split()[3:5] == ["2", "1"]
    assert not row.startswith("*") and row_of(table, "cpu").startswith("*")


def test_device_fakeaccel_picks_it(fakeaccel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLLM_PLUGINS", raising=False)
    code, table = run_cli("--device", "fakeaccel")
    assert code == 0 and row_of(table, "fakeaccel").startswith("*")
    platform = get_platform("fakeaccel")
    assert type(platform).__module__ == "pllm_fakeaccel.platform"
    manager = PluginManager()
    eager = manager.update_config(platform, EngineConfig())
    assert eager.device.enforce_eager  # the plugin's own pllm_update_config ran
    assert not manager.update_config(get_platform("cpu"), EngineConfig()).device.enforce_eager


def test_fakeaccel_score_env_tie_and_allow_list(
    fakeaccel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLLM_FAKEACCEL_SCORE", "10")
    monkeypatch.delenv("PLLM_PLUGINS", raising=False)
    with pytest.raises(
        AmbiguousPlatformError, match=r"'cpu' \(built-in\), 'fakeaccel' \(pllm-fakeaccel 0.3.1\)"
    ):
        get_platform()
    monkeypatch.setenv("PLLM_PLUGINS", "fakeaccel")
    assert get_platform().name == "fakeaccel"


def test_fakeaccel_passes_the_conformance_suite(fakeaccel: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pllm.entrypoints.platforms_cmd", "--check", fakeaccel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout
