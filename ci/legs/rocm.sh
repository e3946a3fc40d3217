#!/usr/bin/env bash
# leg-hardware: an AMD Instinct GPU (MI200/MI300) with the ROCm driver (/dev/kfd)
# leg-env: $PYTHON, else .venv if install.sh got a ROCm torch (PLLM_TORCH_SPEC), else ~/.cache/pllm-ci/rocm (set PLLM_TORCH_SPEC to a ROCm wheel)
# leg-checks: pllm platforms --check rocm; the cuda leg's scripts on the AMD GPU: compiled Triton kernels vs the reference + timing, pytest -m "cuda or rocm", greedy parity and throughput vs HF transformers
# leg-runner: [self-hosted, linux, amd-mi300]
#
# The rocm platform runs the same Triton kernels as cuda (torch's cuda device
# is HIP under a ROCm build), so this leg runs the cuda leg's scripts.
LEG=rocm
LEG_ARG="${1:-}"
GPU_PLATFORM=rocm
export PLLM_GPU_MARKERS="${PLLM_GPU_MARKERS:-cuda or rocm}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$ROOT/ci/legs/cuda/gpu_leg.sh"

why_not_here() {
    if [ ! -e /dev/kfd ]; then
        echo "needs an AMD GPU host with the ROCm driver (no /dev/kfd)"
    elif [ "$(gpu_python)" != "$GPU_CACHE_ENV/bin/python" ] && ! gpu_torch_ok "$(gpu_python)"; then
        echo "needs a ROCm build of torch in $(gpu_python) that sees the GPU"
    fi
}
leg_gate why_not_here
gpu_leg_run
