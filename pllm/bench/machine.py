"""What a result must carry about where it was measured, and the machine's own limits."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time


def children_rss_bytes() -> int:
    """Resident memory of this process's descendants now: tensor-parallel
    rank processes, and a Ray cluster this process started (its GCS,
    raylet, workers and actors)."""
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux's VmHWM first: ``ru_maxrss`` survives ``exec``, so a subprocess would
    report its parent's peak whenever that was higher."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def cpu_times() -> tuple[float, float] | None:
    """(steal, total) seconds of the whole host's CPU time since boot; None
    where the OS reports no steal (it is Linux's). Steal is time the
    hypervisor gave this virtual machine's CPUs to others while they had
    work: a run that had much of it measured a slower machine than the
    others."""
    import psutil

    try:
        times = psutil.cpu_times()
    except OSError:
        return None
    if not hasattr(times, "steal"):
        return None
    # Guest time is already counted in user and nice.
    total = sum(v for k, v in times._asdict().items() if k not in ("guest", "guest_nice"))
    return times.steal, total


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the host's CPU time stolen between two :func:`cpu_times`."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "neon")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


# Variables that keep torch, oneDNN, MKL or pllm's kernels off some of the
# CPU's instructions: a run under any of them is not the host's full speed.
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                     "MKL_ENABLE_INSTRUCTIONS", "PLLM_CPU_MARCH")


def machine_info() -> dict:
    import psutil
    import torch

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "num_physical_cores": psutil.cpu_count(logical=False),
        "num_logical_cpus": os.cpu_count(),
        "num_usable_cpus": len(affinity) if affinity is not None else os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "isa_caps": {k: os.environ[k] for k in ISA_CAP_VARIABLES if os.environ.get(k)},
    }


def versions() -> dict:
    import torch

    from pllm import __version__

    out = {"pllm": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


def measure_read_bandwidth(size_mib: int = 256, num_repeats: int = 10) -> dict:
    """Read bandwidth as torch sees it: the best of ``num_repeats`` sums of a
    ``size_mib`` fp32 tensor (large enough to miss every cache), on torch's
    current thread count. GB are 10^9 bytes."""
    import torch

    x = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32)
    x.sum()  # fault the pages in and warm the kernel
    times = []
    for _ in range(num_repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    num_bytes = x.numel() * x.element_size()
    del x
    return {
        "read_bandwidth_gb_per_s": num_bytes / min(times) / 1e9,
        "read_bandwidth_median_gb_per_s": num_bytes / statistics.median(times) / 1e9,
        "tensor_bytes": num_bytes,
        "num_repeats": num_repeats,
        "num_threads": torch.get_num_threads(),
    }
