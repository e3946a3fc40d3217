"""Detection and capabilities of the built-in platforms, in faked
environments: torch.version, torch.cuda, importlib.util.find_spec, device
files. No accelerator is needed; each test states the machine it imitates."""

from __future__ import annotations

import fnmatch
import glob
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys

import pytest
import torch

from pllm.platforms.common.xla.platform import ACCELERATOR_SCORE, EMULATE_ENV, EMULATED_SCORE
from pllm.platforms.cpu.platform import CPUPlatform
from pllm.platforms.cuda.platform import CudaPlatform, cuda_capabilities
from pllm.platforms.ipex import platform as ipex_platform
from pllm.platforms.ipex.platform import IPEXPlatform
from pllm.platforms.neuron.platform import NeuronPlatform
from pllm.platforms.rocm.platform import RocmPlatform, rocm_capabilities
from pllm.platforms.tpu.platform import TPUPlatform
from pllm.plugins.manager import PluginManager

BUILTINS = ["cpu", "cuda", "rocm", "tpu", "neuron", "ipex"]
VENDOR_MODULES = {
    "pynvml",
    "amdsmi",
    "libtpu",
    "torch_xla",
    "jax",
    "torch_neuronx",
    "neuronxcc",
    "intel_extension_for_pytorch",
}


class Machine:
    """Fakes what detection reads. Vendor modules are absent unless listed in
    ``modules``; device files exist only if listed in ``files``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.modules: set[str] = set()
        self.distributions: dict[str, str] = {}  # installed distributions (importlib.metadata)
        self.files: list[str] = []
        real_find_spec, real_glob, real_exists = importlib.util.find_spec, glob.glob, os.path.exists

        def find_spec(name: str, package: str | None = None):  # noqa: ANN202
            if name in self.modules:
                return importlib.machinery.ModuleSpec(name, None)
            return None if name in VENDOR_MODULES else real_find_spec(name, package)

        def fake_glob(pattern: str, **kwargs: object) -> list[str]:
            if pattern.startswith("/dev/"):
                return [f for f in self.files if fnmatch.fnmatch(f, pattern)]
            return real_glob(pattern, **kwargs)

        def exists(path: object) -> bool:
            if isinstance(path, str) and path.startswith("/dev/"):
                return path in self.files
            return real_exists(path)

        real_version = importlib.metadata.version

        def version(name: str) -> str:
            if name in self.distributions:
                return self.distributions[name]
            if name == ipex_platform.DISTRIBUTION:
                raise importlib.metadata.PackageNotFoundError(name)
            return real_version(name)

        monkeypatch.setattr(importlib.metadata, "version", version)
        monkeypatch.delenv(EMULATE_ENV, raising=False)
        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        monkeypatch.setattr(glob, "glob", fake_glob)
        monkeypatch.setattr(os.path, "exists", exists)
        self.torch_build(cuda=None, hip=None)
        self.gpus(0)
        self.host_cpu("x86_64", "GenuineIntel", "avx2 avx512f")

    def host_cpu(self, machine: str, vendor: str, flags: str) -> None:
        """What the ipex platform reads of the CPU: architecture, vendor, flags."""
        self.mp.setattr(ipex_platform.host, "machine", lambda: machine)
        self.mp.setattr(ipex_platform, "cpu_vendor", lambda: vendor)
        self.mp.setattr(ipex_platform, "cpu_flags", lambda: frozenset(flags.split()))

    def torch_build(self, *, cuda: str | None, hip: str | None) -> None:
        self.mp.setattr(torch.version, "cuda", cuda)
        self.mp.setattr(torch.version, "hip", hip)

    def gpus(self, count: int) -> None:
        self.mp.setattr(torch.cuda, "is_available", lambda: count > 0)
        self.mp.setattr(torch.cuda, "device_count", lambda: count)

    def selected(self) -> str:
        return PluginManager(allow=BUILTINS).resolve("auto").name


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Machine:
    return Machine(monkeypatch)


def test_nothing_present_selects_cpu(machine: Machine) -> None:
    assert CudaPlatform.detect().reason == f"torch {torch.__version__} is not a CUDA build"
    assert RocmPlatform.detect().score == 0
    assert "torch_xla is not installed" in TPUPlatform.detect().reason
    assert "torch_neuronx is not installed" in NeuronPlatform.detect().reason
    assert IPEXPlatform.detect().reason.startswith("intel-extension-for-pytorch is not installed")
    assert CPUPlatform.detect().available
    assert machine.selected() == "cpu"


def test_ipex_for_another_torch_is_unavailable_naming_both(machine: Machine) -> None:
    """IPEX pins one torch release; importing it against another crashes the
    process, so detection reads versions and says which it needs."""
    machine.distributions[ipex_platform.DISTRIBUTION] = "2.8.0"
    machine.mp.setattr(torch, "__version__", "2.13.0+cpu")
    detection = IPEXPlatform.detect()
    assert detection.score == 0
    assert "intel-extension-for-pytorch 2.8.0 needs torch 2.8.*, this is torch 2.13.0+cpu" in (
        detection.reason)
    assert "intel_extension_for_pytorch" not in sys.modules  # never imported to find out
    assert machine.selected() == "cpu"


def test_ipex_is_preferred_on_intel_cpus_with_bf16_by_default_where_native(
        machine: Machine) -> None:
    machine.distributions[ipex_platform.DISTRIBUTION] = "2.8.0+cpu"
    machine.mp.setattr(torch, "__version__", "2.8.0+cu128")
    machine.host_cpu("x86_64", "GenuineIntel", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    detection = IPEXPlatform.detect()
    assert detection.score > CPUPlatform.detect().score
    assert "AMX on an Intel CPU: preferred over cpu" in detection.reason
    assert machine.selected() == "ipex"
    assert IPEXPlatform().capabilities.default_dtype == torch.bfloat16
    machine.host_cpu("x86_64", "GenuineIntel", "avx2 avx512f")  # no bf16 units: fp32
    assert IPEXPlatform().capabilities.default_dtype == torch.float32
    assert machine.selected() == "ipex"


def test_ipex_elsewhere_is_selectable_not_preferred(machine: Machine) -> None:
    machine.distributions[ipex_platform.DISTRIBUTION] = "2.8.0"
    machine.mp.setattr(torch, "__version__", "2.8.0")
    machine.host_cpu("x86_64", "AuthenticAMD", "avx2 avx512f avx512_bf16")
    detection = IPEXPlatform.detect()
    assert 0 < detection.score < CPUPlatform.detect().score
    assert "AVX-512 with bf16 on this AuthenticAMD CPU: available with --device ipex" in (
        detection.reason)
    assert machine.selected() == "cpu"
    assert PluginManager(allow=BUILTINS).resolve("ipex").name == "ipex"
    machine.host_cpu("x86_64", "GenuineIntel", "sse4_2")
    assert "AVX2 at least" in IPEXPlatform.detect().reason
    machine.host_cpu("aarch64", "unknown", "")
    assert IPEXPlatform.detect().reason == "IPEX's CPU build runs on x86-64 only (this host is aarch64)"


def test_cuda_present(machine: Machine) -> None:
    machine.torch_build(cuda="12.4", hip=None)
    machine.gpus(2)
    detection = CudaPlatform.detect()
    assert detection.score == 100
    assert detection.reason == f"2 NVIDIA GPU(s) visible (torch {torch.__version__}, CUDA 12.4)"
    assert "not a ROCm build" in RocmPlatform.detect().reason
    assert machine.selected() == "cuda"


def test_cuda_build_without_gpu(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    machine.torch_build(cuda="12.4", hip=None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    detection = CudaPlatform.detect()
    assert detection.score == 0
    assert "built for CUDA 12.4 but sees no GPU" in detection.reason
    assert "CUDA_VISIBLE_DEVICES=''" in detection.reason
    assert machine.selected() == "cpu"


def test_nvidia_driver_with_cpu_torch_hints_at_the_fix(machine: Machine) -> None:
    machine.files = ["/dev/nvidia0", "/dev/nvidiactl"]
    assert "install a CUDA build of torch" in CudaPlatform.detect().reason


def test_rocm_build(machine: Machine) -> None:
    machine.torch_build(cuda=None, hip="6.2.41133")
    machine.gpus(1)
    machine.files = ["/dev/kfd"]
    rocm = RocmPlatform.detect()
    assert (
        rocm.score == 100
        and "1 AMD GPU(s) visible" in rocm.reason
        and "ROCm 6.2.41133" in rocm.reason
    )
    cuda = CudaPlatform.detect()
    assert cuda.score == 0 and "ROCm build" in cuda.reason and "--device rocm" in cuda.reason
    assert machine.selected() == "rocm"


def test_rocm_build_without_gpu_and_driver_without_rocm_torch(machine: Machine) -> None:
    machine.torch_build(cuda=None, hip="6.2")
    assert (
        "sees no GPU" in RocmPlatform.detect().reason
        and "/dev/kfd missing" in RocmPlatform.detect().reason
    )
    machine.torch_build(cuda=None, hip=None)
    machine.files = ["/dev/kfd"]
    assert "install a ROCm build of torch" in RocmPlatform.detect().reason


def test_tpu_present(machine: Machine) -> None:
    machine.modules |= {"torch_xla", "libtpu", "jax"}
    machine.files = ["/dev/accel0", "/dev/accel1", "/dev/accel2", "/dev/accel3"]
    detection = TPUPlatform.detect()
    assert detection.score == ACCELERATOR_SCORE and "4 TPU device file(s)" in detection.reason
    assert "runtime: torch_xla, libtpu" in detection.reason
    assert machine.selected() == "tpu"  # an accelerator beats the host
    assert TPUPlatform().device_count() == 4


def test_tpu_v5e_vfio_devices(machine: Machine) -> None:
    machine.modules.add("torch_xla")
    machine.files = ["/dev/vfio/0", "/dev/vfio/vfio"]
    detection = TPUPlatform.detect()
    assert detection.available and "/dev/vfio/0" in detection.reason
    assert "/dev/vfio/vfio" not in detection.reason


def test_tpu_software_without_device_never_imports_it(machine: Machine) -> None:
    machine.modules |= {"libtpu", "torch_xla", "jax"}  # findable, not importable here
    detection = TPUPlatform.detect()
    assert detection.score == 0 and "not a TPU host" in detection.reason
    assert not {"libtpu", "torch_xla", "jax"} & set(sys.modules)


def test_tpu_runtime_without_torch_xla(machine: Machine) -> None:
    """pllm drives TPUs through torch_xla: libtpu or jax alone is not enough."""
    machine.modules |= {"jax", "libtpu"}
    machine.files = ["/dev/accel0"]
    detection = TPUPlatform.detect()
    assert detection.score == 0 and "torch_xla is not installed" in detection.reason
    assert "jax is installed, but pllm drives TPUs through torch_xla" in detection.reason
    assert "libtpu installed" in detection.reason


def test_neuron_present(machine: Machine) -> None:
    machine.modules |= {"torch_neuronx", "neuronxcc"}
    machine.files = ["/dev/neuron0", "/dev/neuron1"]
    detection = NeuronPlatform.detect()
    assert detection.score == ACCELERATOR_SCORE and "2 Neuron device(s)" in detection.reason
    assert "neuronx-cc installed" in detection.reason
    assert machine.selected() == "neuron"


def test_neuron_sdk_without_compiler_device_or_sdk(machine: Machine) -> None:
    machine.modules.add("torch_neuronx")
    assert "no /dev/neuron<n> device" in NeuronPlatform.detect().reason
    machine.files = ["/dev/neuron0"]
    detection = NeuronPlatform.detect()
    assert detection.score == 0 and "compiler (neuronx-cc) is not installed" in detection.reason
    machine.modules.clear()
    detection = NeuronPlatform.detect()
    assert detection.score == 0 and "1 Neuron device file(s) exist" in detection.reason


@pytest.mark.parametrize("platform_cls", [TPUPlatform, NeuronPlatform])
def test_xla_emulation_is_an_explicit_opt_in(machine: Machine, monkeypatch,
                                             platform_cls: type) -> None:
    """PLLM_XLA_EMULATE=cpu makes the platform run on XLA's CPU backend: it
    needs torch_xla, says what it is, and never wins --device auto."""
    assert platform_cls.detect().score == 0  # no chip, no opt-in: as before
    monkeypatch.setenv(EMULATE_ENV, "cpu")
    detection = platform_cls.detect()
    assert detection.score == 0 and "torch_xla is not installed" in detection.reason
    machine.modules.add("torch_xla")
    detection = platform_cls.detect()
    assert detection.score == EMULATED_SCORE
    assert detection.reason.startswith(
        f"XLA on the host CPU (PJRT CPU), emulating a {platform_cls.label}: for tests, not speed")
    assert machine.selected() == "cpu"
    assert platform_cls().device_count() == 1
    with pytest.raises(ValueError, match="tensor parallelism does not run on XLA's CPU backend"):
        platform_cls().make_communicator(0, 2, "file:///nonexistent")
    monkeypatch.setenv(EMULATE_ENV, "tpu")
    assert "the one emulation pllm has is 'cpu'" in platform_cls.detect().reason


@pytest.mark.parametrize("platform_cls", [TPUPlatform, NeuronPlatform])
def test_xla_platform_capabilities(platform_cls: type) -> None:
    platform = platform_cls()
    assert platform.device(1) == torch.device("xla", 0)  # one rank per process
    caps = platform.capabilities
    assert caps.static_shapes and caps.seq_buckets and caps.default_dtype == torch.bfloat16
    assert list(caps.token_buckets) == sorted(caps.token_buckets)
    assert not caps.inference_mode and caps.head_dims is None


def test_cuda_capabilities_follow_compute_capability() -> None:
    hopper = cuda_capabilities((9, 0))
    assert hopper.default_dtype == torch.bfloat16 and hopper.kv_cache_dtypes == (torch.float8_e4m3fn, torch.float8_e5m2)
    assert set(hopper.dtypes) == {torch.bfloat16, torch.float16, torch.float32}
    assert hopper.supports_graphs and hopper.head_dims == (64, 128, 256)
    assert hopper.block_sizes == (16, 32) and hopper.default_block_size == 16
    assert not cuda_capabilities((8, 0)).supports_fp8
    turing = cuda_capabilities((7, 5))
    assert turing.default_dtype == torch.float16 and not turing.supports_dtype(torch.bfloat16)
    assert cuda_capabilities(None) == hopper


def test_rocm_capabilities_follow_the_architecture() -> None:
    assert rocm_capabilities("gfx942:sramecc+:xnack-").kv_cache_dtypes == (torch.float8_e4m3fnuz,)
    assert rocm_capabilities(None).kv_cache_dtypes == (torch.float8_e4m3fnuz,)
    assert rocm_capabilities("gfx950").kv_cache_dtypes == (torch.float8_e4m3fn,)
    assert rocm_capabilities("gfx90a").kv_cache_dtypes == ()
    assert rocm_capabilities("gfx942").default_dtype == torch.bfloat16


def test_cpu_capabilities() -> None:
    platform = CPUPlatform()
    caps = platform.capabilities
    assert caps.default_dtype == torch.float32 and set(caps.dtypes) == {
        torch.float32,
        torch.bfloat16,
    }
    assert not caps.static_shapes and caps.ranks_share_device
    assert platform.device() == torch.device("cpu") and platform.device_count() == 1
