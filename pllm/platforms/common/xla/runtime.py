"""The few torch-xla calls the XLA platforms make, each importing torch_xla
when first called (never at import time: the plugin loads on hosts without
it). ``PJRT_DEVICE`` picks the runtime's backend and must be set before the
first of them: :func:`start` does that."""

from __future__ import annotations

import os

import torch

PJRT_ENV = "PJRT_DEVICE"


def start(pjrt_device: str) -> None:
    """Point torch-xla's runtime at ``pjrt_device`` ("TPU", "NEURON", "CPU")
    unless the environment already chose one, then load it."""
    os.environ.setdefault(PJRT_ENV, pjrt_device)
    import torch_xla  # noqa: F401  (loads the runtime for PJRT_DEVICE)


def device() -> torch.device:
    """This process's XLA device."""
    import torch_xla

    return torch_xla.device()


def sync() -> None:
    """Cut the lazily traced graph here: compile it (or take it from the
    cache) and launch it. Called once per step by the runner."""
    import torch_xla

    torch_xla.sync()


def wait() -> None:
    """Block until the device has run everything launched."""
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


def compilations() -> tuple[int, float]:
    """How many XLA programs this process has compiled, and the seconds
    spent compiling them (torch-xla's ``CompileTime`` metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    if not data:
        return 0, 0.0
    count, total_ns = data[0], data[1]
    return int(count), total_ns / 1e9


def memory_limit(dev: torch.device) -> tuple[int, int] | None:
    """``(bytes_limit, bytes_used)`` of an XLA device's memory, or None where
    the runtime does not report it (PJRT CPU does not)."""
    import torch_xla.core.xla_model as xm

    try:
        info = xm.get_memory_info(dev)
    except RuntimeError:
        return None
    limit = info.get("bytes_limit") or info.get("kb_total", 0) * 1024
    used = info.get("bytes_used") or (info.get("kb_total", 0) - info.get("kb_free", 0)) * 1024
    return (int(limit), int(used)) if limit else None
