"""The CPU platform's compiled kernels (paged decode attention, single-row GEMV), built on first use with torch's C++
extension loader (g++ and ninja) and cached under ``$TORCH_EXTENSIONS_DIR``
(``~/.cache/torch_extensions``). Where they cannot be built, the platform
uses its pure-torch path and logs why once."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DISABLE_ENV = "PLLM_CPU_KERNELS"  # "0" forces the pure-torch path


_SOURCES = ("paged_decode.cpp", "gemv.cpp")


@functools.cache
def _module():
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        csrc = Path(__file__).parent / "csrc"
        return load_inline(
            name="pllm_cpu_kernels",
            cpp_sources=[(csrc / name).read_text() for name in _SOURCES],
            functions=["paged_decode", "gemv"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, ...: fall back, but say so
        logger.warning("CPU kernels unavailable (%s); using the torch paths", exc)
        return None


def paged_decode_op():
    """The compiled ``paged_decode`` function, or None (with the reason logged)."""
    module = _module()
    return None if module is None else module.paged_decode


def gemv_op():
    """The compiled single-row ``gemv`` function, or None."""
    module = _module()
    return None if module is None else module.gemv
