"""The CPU platform's compiled kernels, built on first use with torch's C++
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


@functools.cache
def paged_decode_op():
    """The compiled ``paged_decode`` function, or None (with the reason logged)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        source = (Path(__file__).parent / "csrc" / "paged_decode.cpp").read_text()
        module = load_inline(
            name="pllm_cpu_paged_decode",
            cpp_sources=[source],
            functions=["paged_decode"],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        return module.paged_decode
    except Exception as exc:  # no compiler, no ninja, ...: fall back, but say so
        logger.warning("CPU paged-decode kernel unavailable (%s); using the torch path", exc)
        return None
