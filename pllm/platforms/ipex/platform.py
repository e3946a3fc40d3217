"""The Intel CPU platform: Intel Extension for PyTorch (IPEX) on the host.

PagedAttention runs on IPEX's LLM operators (``attention.py``), the model's
norms, rotary embedding and linear layers on IPEX's fused modules where they
measured faster (``layers.py``); the KV-cache budget, the collectives (gloo,
the all-reduce through shared memory) and the thread split among
tensor-parallel ranks are the host building blocks of ``common.host``.

IPEX is built against one torch release: 2.8 takes torch 2.8 only, and
importing it against another torch crashes the process. Detection therefore
reads the installed versions (``importlib.metadata``) and never imports it;
the engine imports it once this platform was chosen.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform as host

import torch

from pllm.core.interfaces import AttentionBackend, Detection, PlatformCapabilities
from pllm.platforms.common.host import CPU_SCORE, HostPlatform, cpu_flags, cpu_vendor

DISTRIBUTION = "intel-extension-for-pytorch"
INTEL_SCORE = CPU_SCORE + 10  # preferred over cpu on Intel CPUs
OTHER_SCORE = CPU_SCORE // 2  # selectable elsewhere, not preferred (README: measured slower)


def _major_minor(version: str) -> tuple[int, ...]:
    release = version.split("+")[0].split(".")
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in release[:2])


def isa(flags: frozenset[str]) -> str | None:
    """The best of the instruction sets IPEX dispatches on that this CPU has."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 with bf16"
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    return None


def has_native_bf16(flags: frozenset[str]) -> bool:
    """bf16 matrix products in hardware (AMX or AVX-512 bf16): where bf16 is the default."""
    return "amx_bf16" in flags or "avx512_bf16" in flags


class IPEXPlatform(HostPlatform):
    name = "ipex"

    @classmethod
    def detect(cls) -> Detection:
        machine = host.machine()
        if machine not in ("x86_64", "AMD64"):
            return Detection(0, f"IPEX's CPU build runs on x86-64 only (this host is {machine})")
        try:
            ipex_version = importlib.metadata.version(DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            return Detection(0, f"{DISTRIBUTION} is not installed (pip install 'pllm[ipex]' with "
                                "the torch release it is built for: pllm/platforms/ipex/README.md)")
        if _major_minor(ipex_version) != _major_minor(torch.__version__):
            want = ".".join(map(str, _major_minor(ipex_version)))
            return Detection(0, f"{DISTRIBUTION} {ipex_version} needs torch {want}.*, this is torch "
                                f"{torch.__version__}: install both in an environment of their own "
                                "(pllm/platforms/ipex/README.md)")
        flags = cpu_flags()
        best = isa(flags)
        if best is None:
            return Detection(0, "IPEX needs a CPU with AVX2 at least (none in /proc/cpuinfo)")
        vendor = cpu_vendor()
        versions = f"IPEX {ipex_version} on torch {torch.__version__}, {best}"
        if vendor == "GenuineIntel":
            return Detection(INTEL_SCORE, f"{versions} on an Intel CPU: preferred over cpu")
        return Detection(OTHER_SCORE, f"{versions} on this {vendor} CPU: available with --device ipex, "
                                      "not preferred (slower than cpu on non-Intel CPUs as measured; "
                                      "see pllm/platforms/ipex/README.md)")

    @property
    def capabilities(self) -> PlatformCapabilities:
        return ipex_capabilities(has_native_bf16(cpu_flags()))

    def make_attention_backend(self) -> AttentionBackend:
        from pllm.platforms.ipex.attention import IPEXAttentionBackend

        return IPEXAttentionBackend()

    def prepare_model(self, model, config):
        from pllm.platforms.common.malloc import tune_malloc
        from pllm.platforms.ipex.layers import use_ipex_layers

        tune_malloc()
        return use_ipex_layers(model)


@functools.cache
def ipex_capabilities(native_bf16: bool) -> PlatformCapabilities:
    return PlatformCapabilities(
        dtypes=(torch.float32, torch.bfloat16),
        default_dtype=torch.bfloat16 if native_bf16 else torch.float32,
        # IPEX's fp8 cache is e5m2 only (its reshape_and_cache refuses e4m3).
        kv_cache_dtypes=(torch.float8_e5m2,),
        supports_soft_cap=True,  # IPEX's operators take ``softcap``
        ranks_share_device=True,  # tensor-parallel ranks split the cores
        pipeline_parallel=True,  # the host's gloo communicator, as the CPU's
    )
