"""Building a plugin's C++ kernels: torch's C++ extension loader (g++ and
ninja), cached under ``$TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions``)
in a folder named for everything the build depends on (:func:`extension_name`).
Environments and hosts that share the cache (another torch, another Python, a
home directory on several machines) each keep their own build there instead
of rebuilding over each other's. A build logs what it compiles and why; a
load from the cache is quick and quiet."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from pllm.platforms.common.host import cpu_flags

logger = logging.getLogger(__name__)

# No contraction of a*b+c into FMAs beyond the explicit ones, so the
# elementwise kernels round as torch's own ops do.
_CFLAGS = ("-O3", "-march={march}", "-fopenmp", "-ffp-contract=off")
_LDFLAGS = ("-fopenmp",)
# The CPU the kernels are built for: this one unless the variable names
# another of the compiler's -march values (x86-64-v3: AVX2 and FMA, no
# AVX-512), e.g. to run an AVX-512 host on the AVX2 paths.
MARCH_ENV = "PLLM_CPU_MARCH"


def march() -> str:
    """The ``-march`` the kernels are built for: ``$PLLM_CPU_MARCH``, else ``native``."""
    value = os.environ.get(MARCH_ENV, "").strip() or "native"
    if not re.fullmatch(r"[\w.+-]+", value):
        raise ValueError(f"{MARCH_ENV}={value!r} is not a -march value (e.g. native, x86-64-v3)")
    return value


def compile_flags(defines: Iterable[str] = ()) -> list[str]:
    """The compiler flags of a build with these preprocessor macros."""
    return [*(flag.format(march=march()) for flag in _CFLAGS), *(f"-D{d}" for d in defines)]


@functools.cache
def compiler_version() -> str:
    """The first line of ``--version`` of the compiler torch builds with
    (``$CXX``, else ``c++``); just the command where it does not run."""
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, ValueError, subprocess.SubprocessError):
        return cxx
    return out.splitlines()[0] if out else cxx


def extension_name(name: str, sources: Iterable[str], cflags: Iterable[str]) -> str:
    """``name`` keyed by what its build depends on: torch's full version and
    the Python ABI in words, then a hash of the sources' text, the compiler
    flags, the compiler, this host's CPU features (``-march=native``) and
    where torch is installed, e.g. ``pllm_cpu_kernels_torch2_13_0_cpu_cp311_1f2e3d4c``.
    The build compiles against that installation's headers, so two virtual
    environments with the same torch would otherwise share one build folder
    and each rebuild it after the other had used it."""
    key = repr((tuple(sources), tuple(cflags), _LDFLAGS, compiler_version(), sorted(cpu_flags()),
                os.path.dirname(torch.__file__)))
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    release = re.sub(r"\W", "_", torch.__version__)  # 2.13.0+cpu: 2_13_0_cpu
    abi = f"cp{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return f"{name}_torch{release}_{abi}_{digest}"


def build_extension(name: str, csrc: Path, sources: Iterable[str], functions: Iterable[str],
                    defines: Iterable[str] = ()):
    """Compile ``sources`` (file names under ``csrc``, in order, as one
    translation unit) into the extension ``name`` exposing ``functions``, or
    load it from the cache; ``defines`` are extra preprocessor macros. Raises
    when it cannot build (no compiler, no ninja): the caller decides what to
    fall back to."""
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory, load_inline

    sources = list(sources)
    texts = [(csrc / source).read_text() for source in sources]
    cflags = compile_flags(defines)
    full_name = extension_name(name, texts, cflags)
    build_dir = Path(_get_build_directory(full_name, verbose=False))
    cached = (build_dir / f"{full_name}{LIB_EXT}").exists()
    if not cached:
        logger.info("building %s (%s): none cached yet for torch %s, Python %d.%d, %s, flags %s, "
                    "this CPU and these sources; takes up to a minute, once, into %s",
                    name, ", ".join(sources), torch.__version__, *sys.version_info[:2],
                    compiler_version(), " ".join(cflags), build_dir)
    t0 = time.perf_counter()
    module = load_inline(name=full_name, cpp_sources=texts, functions=list(functions),
                         extra_cflags=cflags, extra_ldflags=list(_LDFLAGS), verbose=False)
    elapsed = time.perf_counter() - t0
    if cached:
        logger.debug("loaded %s from %s in %.1fs", name, build_dir, elapsed)
    else:
        logger.info("built %s in %.1fs", name, elapsed)
    return module
