"""pllm's import graph, from an AST walk over every module (imports inside
functions included):

* the device-agnostic layers (core, models, loader) import no vendor library,
  never touch ``torch.cuda`` and import no platform;
* platforms are peers: ``pllm/platforms/<x>`` imports no other platform,
  only ``platforms/common`` and the shared Triton folder; those two import
  no platform; nothing outside ``pllm/platforms`` imports a platform;
* no cycle among module-level imports;
* and, in a real interpreter, ``PLLM_PLUGINS=cuda`` loads no CPU module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pllm"
CHECKED = ("core", "models", "loader")
FORBIDDEN = (
    "torch.cuda",
    "torch_xla",
    "jax",
    "jaxlib",
    "libtpu",
    "triton",
    "intel_extension_for_pytorch",
    "torch_neuronx",
    "neuronxcc",
    "pynvml",
    "amdsmi",
)
IMPORTERS = {"import_module", "__import__", "find_spec"}


def _forbidden(module: str) -> str | None:
    for name in FORBIDDEN:
        if module == name or module.startswith(name + "."):
            return name
    return None


def violations(source: str, filename: str = "<string>") -> list[str]:
    """Every vendor import, ``torch.cuda`` reference or import-by-string in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        line = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{line} import {a.name}" for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if any(_forbidden(n) for n in names):
                found.append(f"{line} from {node.module} import ...")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "cuda"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            found.append(f"{line} torch.cuda")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0].value
            if called in IMPORTERS and isinstance(target, str) and _forbidden(target):
                found.append(f"{line} {called}({target!r})")
    return found


def checked_files() -> list[Path]:
    return sorted(p for sub in CHECKED for p in (ROOT / sub).rglob("*.py"))


def test_the_checked_packages_exist() -> None:
    files = checked_files()
    for sub in CHECKED:
        assert (ROOT / sub / "__init__.py").is_file(), sub
    assert any(p.parent.name == "core" for p in files)


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_vendor_imports(path: Path) -> None:
    assert violations(path.read_text(), str(path.relative_to(ROOT.parent))) == []


@pytest.mark.parametrize(
    "source",
    [
        "import torch.cuda",
        "import triton.language as tl",
        "from torch import cuda",
        "from torch.cuda import graphs",
        "from jax import numpy",
        "import torch_xla.core.xla_model as xm",
        "import pynvml, amdsmi",
        "torch.cuda.synchronize()",
        "x = torch.cuda.is_available",
        "importlib.import_module('intel_extension_for_pytorch')",
        "__import__('torch_neuronx')",
        "importlib.util.find_spec('neuronxcc')",
    ],
)
def test_checker_catches(source: str) -> None:
    assert violations(source)


@pytest.mark.parametrize(
    "source",
    [
        "import torch",
        "from torch import nn",
        "import jaxtyping",
        "x.cuda_graphs = 1",
        "from .triton_like import f",
        "tensor.to(device)",
    ],
)
def test_checker_allows(source: str) -> None:
    assert violations(source) == []


# ---- the pllm-internal import graph -------------------------------------------

SHARED_PLATFORM_FOLDERS = ("common", "triton")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pllm_imports(path: Path, source: str | None = None, *,
                 top_level_only: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``pllm`` module ``path`` (or ``source``, read
    as if it lived there) imports, relative imports resolved;
    ``top_level_only``: at import time, outside ``if TYPE_CHECKING:`` blocks
    and function bodies."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = ast.walk(tree)
    if top_level_only:
        nodes = _import_time_nodes(tree.body)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m == "pllm" or m.startswith("pllm.")]


def _import_time_nodes(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                continue
            yield from _import_time_nodes(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _import_time_nodes(node.body + node.orelse + node.finalbody)


def _platform_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["pllm", "platforms"] else None


def all_files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def import_graph_violations(files: list[Path], sources: dict[Path, str] | None = None) -> list[str]:
    found = []
    for path in files:
        name = module_name(path)
        mine = _platform_of(name)
        for line, target in pllm_imports(path, (sources or {}).get(path)):
            theirs = _platform_of(target)
            if theirs is None or theirs == mine:
                continue
            where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
            if mine is None:
                found.append(f"{where}: only platforms import platforms")
            elif theirs not in SHARED_PLATFORM_FOLDERS:
                found.append(f"{where}: a platform imports only common/ and triton/")
            elif mine in SHARED_PLATFORM_FOLDERS and theirs != "common":
                found.append(f"{where}: the shared folders import no platform")
    return found


def test_platforms_are_peers() -> None:
    assert import_graph_violations(all_files()) == []


@pytest.mark.parametrize("rel,source", [
    ("platforms/rocm/x.py", "from pllm.platforms.cuda.platform import CudaPlatform"),
    ("platforms/cuda/y.py", "from ..cpu import allocator"),
    ("platforms/triton/z.py", "import pllm.platforms.cuda"),
    ("testing/w.py", "from pllm.platforms.cpu.attention import CPUAttentionBackend"),
    ("core/v.py", "def f():\n    from pllm.platforms.common import xla"),
])
def test_the_peer_rule_catches(rel: str, source: str) -> None:
    path = ROOT / rel  # never written: the source is parsed as if it lived there
    assert import_graph_violations([path], {path: source})


@pytest.mark.parametrize("rel,source", [
    ("platforms/rocm/x.py", "from pllm.platforms.triton.platform import TorchGPUPlatform"),
    ("platforms/cpu/y.py", "from ..common.allocator import BudgetKVCacheAllocator"),
    ("platforms/triton/z.py", "from pllm.platforms.common.communicator import NcclCommunicator"),
])
def test_the_peer_rule_allows(rel: str, source: str) -> None:
    path = ROOT / rel
    assert import_graph_violations([path], {path: source}) == []


def test_no_import_cycles_at_module_level() -> None:
    graph: dict[str, set[str]] = {}
    names = {module_name(p) for p in all_files()}
    for path in all_files():
        deps = set()
        for _, target in pllm_imports(path, top_level_only=True):
            # "from pllm.core import config" names a module; "from pllm.x import f", not.
            deps.add(target if target in names else target.rsplit(".", 1)[0])
        graph[module_name(path)] = {d for d in deps if d in names and d != module_name(path)}
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1 and not _is_package_of(dep, node):
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def _is_package_of(package: str, module: str) -> bool:
    """Importing a submodule imports its package first: not a cycle."""
    return module.startswith(package + ".")


def test_selecting_cuda_loads_no_cpu_module() -> None:
    """With ``PLLM_PLUGINS=cuda`` the plugin manager, the engine's modules and
    the conformance suite load, and nothing of the CPU plugin does."""
    code = (
        "import sys, pllm, pllm.core.engine, pllm.testing.conformance\n"
        "from pllm.plugins.manager import PluginManager\n"
        "entries = PluginManager().platforms()\n"
        "assert [e.name for e in entries] == ['cuda'], entries\n"
        "import pllm.platforms.cuda.platform, pllm.platforms.triton.attention\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('pllm.platforms.cpu'))\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PLLM_PLUGINS": "cuda"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_folder_of_modules_is_a_package() -> None:
    """A folder without ``__init__.py`` is a namespace package: it imports in
    an editable install and goes missing from the wheel."""
    folders = {p.parent for p in all_files()}
    assert sorted(str(f.relative_to(ROOT.parent)) for f in folders
                  if not (f / "__init__.py").is_file()) == []
