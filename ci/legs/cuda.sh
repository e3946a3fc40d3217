#!/usr/bin/env bash
# leg-hardware: an NVIDIA GPU (sm80+; sm89+ for the fp8 KV cache) with its driver
# leg-env: $PYTHON, else .venv if install.sh got a CUDA torch (PLLM_TORCH_SPEC), else ~/.cache/pllm-ci/cuda
# leg-checks: pllm platforms --check cuda; compiled Triton kernels vs the reference + timing (cuda/gpu_check.sh); pytest -m cuda, greedy parity and throughput vs HF transformers on the GPU (cuda/gpu_checks.sh, gpu_e2e.py)
# leg-runner: [self-hosted, linux, nvidia-h100]
#
# About 15 minutes on an H100. The scripts it runs stand alone too:
#   ci/legs/cuda/gpu_check.sh SUMMARY.json   kernels only (< 3 min; needs only torch + triton)
#   ci/legs/cuda/gpu_checks.sh OUT_DIR       GPU tests + end to end (about 10 min)
LEG=cuda
LEG_ARG="${1:-}"
GPU_PLATFORM=cuda
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$ROOT/ci/legs/cuda/gpu_leg.sh"

why_not_here() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "needs an NVIDIA GPU host (no nvidia-smi)"
    elif ! nvidia-smi -L >/dev/null 2>&1; then
        echo "needs an NVIDIA GPU host (nvidia-smi finds no GPU)"
    elif [ "$(gpu_python)" != "$GPU_CACHE_ENV/bin/python" ] && ! gpu_torch_ok "$(gpu_python)"; then
        echo "needs a CUDA build of torch in $(gpu_python) that sees the GPU"
    fi
}
leg_gate why_not_here
gpu_leg_run
