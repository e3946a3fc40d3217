"""The device-agnostic layers import no vendor library and never touch
``torch.cuda``: an AST walk over pllm/core, pllm/models and pllm/loader."""

from __future__ import annotations

import ast
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
