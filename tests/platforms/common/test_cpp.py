"""Building C++ kernels (``pllm.platforms.common.cpp``): the cache folder is
named for everything a build depends on, so environments and hosts sharing
the cache keep their own builds; a build that compiles says so, a load from
the cache does not. No compiler runs here: ``load_inline`` is a fake."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from pllm.platforms.common import cpp

_FLAGS = ["-O3", "-march=native"]


def test_the_name_is_readable_and_stable(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    name = cpp.extension_name("pllm_kernels", ["int f();"], _FLAGS)
    assert name == cpp.extension_name("pllm_kernels", ["int f();"], list(_FLAGS))
    assert name.startswith("pllm_kernels_torch2_13_0_cpu_cp3") and name.isidentifier()
    assert len(name.rsplit("_", 1)[1]) == 8


@pytest.mark.parametrize("change", ["torch", "flags", "defines", "cpu", "compiler", "sources",
                                    "environment"])
def test_the_name_changes_with_what_the_build_depends_on(change, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(cpp, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    monkeypatch.setattr(cpp, "compiler_version", lambda: "c++ (Debian 12.2.0-14) 12.2.0")
    sources, flags = ["int f();"], list(_FLAGS)
    before = cpp.extension_name("pllm_kernels", sources, flags)
    if change == "torch":
        monkeypatch.setattr(torch, "__version__", "2.13.0+cu128")
    elif change == "flags":
        flags = ["-O2", "-march=native"]
    elif change == "defines":
        flags = [*flags, "-DPLLM_FP8_TABLE"]
    elif change == "cpu":
        monkeypatch.setattr(cpp, "cpu_flags", lambda: frozenset({"sse2", "avx2", "avx512f"}))
    elif change == "compiler":
        monkeypatch.setattr(cpp, "compiler_version", lambda: "clang version 18.1.8")
    elif change == "environment":  # the same torch in another virtual environment
        monkeypatch.setattr(torch, "__file__", "/elsewhere/.venv/site-packages/torch/__init__.py")
    else:
        sources = ["int f(); int g();"]
    assert cpp.extension_name("pllm_kernels", sources, flags) != before


@pytest.fixture
def fake_load_inline(tmp_path, monkeypatch):
    """``load_inline`` that writes the library torch would, instantly, into
    an empty extensions folder; returns the names it was asked to build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    built = []

    def load_inline(name, **kwargs):
        directory = Path(torch.utils.cpp_extension._get_build_directory(name, verbose=False))
        (directory / f"{name}{torch.utils.cpp_extension.LIB_EXT}").write_bytes(b"")
        built.append(name)
        return name

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", load_inline)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cpp").write_text("int f() { return 1; }\n")
    return built


def test_a_build_is_logged_with_what_and_why_and_a_cached_load_is_not(fake_load_inline, tmp_path,
                                                                       caplog):
    csrc = tmp_path / "csrc"
    with caplog.at_level(logging.INFO, logger=cpp.__name__):
        name = cpp.build_extension("pllm_kernels", csrc, ["k.cpp"], ["f"], defines=["X"])
    assert fake_load_inline == [name] and name.startswith("pllm_kernels_torch")
    building, built = (r.getMessage() for r in caplog.records)
    assert building.startswith("building pllm_kernels (k.cpp): none cached yet for torch "
                               f"{torch.__version__}")
    assert "-DX" in building and str(tmp_path / "extensions" / name) in building
    assert built.startswith("built pllm_kernels in ")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=cpp.__name__):
        assert cpp.build_extension("pllm_kernels", csrc, ["k.cpp"], ["f"], defines=["X"]) == name
    assert fake_load_inline == [name, name] and not caplog.records  # loaded from the cache: quiet

    with caplog.at_level(logging.INFO, logger=cpp.__name__):  # another define: another build
        assert cpp.build_extension("pllm_kernels", csrc, ["k.cpp"], ["f"]) != name
    assert caplog.records[0].getMessage().startswith("building pllm_kernels")


def test_the_kernels_target_this_cpu_unless_told_another(fake_load_inline, tmp_path, monkeypatch):
    monkeypatch.delenv(cpp.MARCH_ENV, raising=False)
    assert cpp.compile_flags(["X"]) == ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off",
                                        "-DX"]
    native = cpp.build_extension("pllm_kernels", tmp_path / "csrc", ["k.cpp"], ["f"])

    monkeypatch.setenv(cpp.MARCH_ENV, "x86-64-v3")  # AVX2 and FMA, no AVX-512
    assert "-march=x86-64-v3" in cpp.compile_flags() and "-march=native" not in cpp.compile_flags()
    avx2 = cpp.build_extension("pllm_kernels", tmp_path / "csrc", ["k.cpp"], ["f"])
    assert avx2 != native and fake_load_inline == [native, avx2]  # each build keeps its own

    monkeypatch.setenv(cpp.MARCH_ENV, "native -O0")
    with pytest.raises(ValueError, match="PLLM_CPU_MARCH='native -O0' is not a -march value"):
        cpp.compile_flags()
