"""The CPU platform's compiled kernels (paged decode attention, the few-row
linear, fused RMSNorm / SiLU-and-mul / rotary, the one-call decoder layer,
products with GGUF blocks and the one-call layer over them),
built (``pllm.platforms.common.cpp``) or loaded from the cache when the
platform sets up a process, before the engine serves: never in a request.
Where they cannot be built, the platform uses its pure-torch path and logs
why once. The shared-memory all-reduce is ``pllm.platforms.common.shm``,
built on its own.

The sources are one translation unit: ``vec.h`` (eight fp32 lanes, AVX2 or
portable) first, then each kernel file."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from pllm.platforms.common.cpp import build_extension

logger = logging.getLogger(__name__)

DISABLE_ENV = "PLLM_CPU_KERNELS"  # "0" forces the pure-torch path


_SOURCES = ("vec.h", "paged_decode.cpp", "linear.cpp", "fused.cpp", "decode_layer.cpp",
            "gguf_linear.cpp", "gguf_decode_layer.cpp")
_FUNCTIONS = ["paged_decode", "linear_small", "rms_norm", "add_rms_norm_", "silu_and_mul", "rotary_",
              "write_kv_", "decode_layer", "decode_layer_attn", "decode_layer_mlp",
              "gguf_linear", "gguf_dequantize", "gguf_isas", "gguf_decode_layer",
              "gguf_decode_layer_attn", "gguf_decode_layer_mlp"]


def build(name: str, sources, functions, defines=()):
    """Compile ``sources`` (file names under this platform's ``csrc``, in
    order) into the extension ``name`` exposing ``functions``; ``defines``
    are extra preprocessor macros (e.g. ``PLLM_FP8_TABLE``, the portable
    8-bit reader)."""
    return build_extension(name, Path(__file__).parent / "csrc", sources, functions, defines)


@functools.cache
def _module():
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    try:
        return build("pllm_cpu_kernels", _SOURCES, _FUNCTIONS)
    except Exception as exc:  # no compiler, no ninja, ...: fall back, but say so
        logger.warning("CPU kernels unavailable (%s); using the torch paths", exc)
        return None


def cpu_ops():
    """The compiled module (``paged_decode``, ``linear_small``, ``rms_norm``,
    ``add_rms_norm_``, ``silu_and_mul``, ``rotary_``, ``write_kv_``,
    ``decode_layer`` and its two halves), or None with the reason logged once."""
    return _module()


def paged_decode_op():
    """The compiled ``paged_decode`` function, or None (with the reason logged)."""
    module = _module()
    return None if module is None else module.paged_decode
