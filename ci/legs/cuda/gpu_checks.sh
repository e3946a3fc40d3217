#!/usr/bin/env bash
# Everything pllm proves on a GPU, in one command (about 10 minutes on an
# H100); the cuda leg (ci/legs/cuda.sh) and the rocm leg run it:
#
#   ci/legs/cuda/gpu_checks.sh OUT_DIR
#
# 1. the GPU tests (pytest -m "$PLLM_GPU_MARKERS", default cuda): the Triton
#    kernels compiled against the reference in fp32/fp16/bf16 and fp8 caches,
#    the MoE grouped GEMM, the quantized-weight GEMMs (GGUF, int8, fp8),
#    CUDA graphs against the eager engine, the fp8 KV cache against
#    transformers with the same rounding;
# 2. ci/legs/cuda/gpu_e2e.py: greedy parity with transformers on the GPU,
#    throughput against HF transformers on the same GPU in the same run (bf16,
#    graphs on and off, fp8 cache), batch-1 decode with and without graphs.
#
# Needs python3 (or $PYTHON) with a GPU build of torch, triton, transformers,
# pluggy and pytest (no network: pllm is installed from this checkout without
# its dependencies; wheels of anything missing, e.g. gguf, may be put in
# .whl/). Each step has its own time limit, so one that hangs leaves the
# others' results. Exit status: non-zero if any step failed.
set -uo pipefail

out="${1:?usage: ci/legs/cuda/gpu_checks.sh OUT_DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
unset TRITON_INTERPRET
PYTHON="${PYTHON:-python3}"
MARKERS="${PLLM_GPU_MARKERS:-cuda}"
log() { echo "== gpu_checks $(date -u +%H:%M:%S): $*"; }

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader \
        || log "nvidia-smi failed"
elif command -v rocm-smi >/dev/null 2>&1; then
    rocm-smi --showproductname || log "rocm-smi failed"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-deps --no-index .whl/*.whl \
        || log "wheels in .whl/ not installed"
fi
if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
    log "pip install -e . failed: using the checkout through PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -m pllm.entrypoints.platforms_cmd > "$out/platforms.txt" 2>&1
cat "$out/platforms.txt"

status=0
log "GPU tests (-m $MARKERS)"
timeout 480 "$PYTHON" -m pytest -q -m "$MARKERS" -p no:cacheprovider \
    --junitxml "$out/gpu_tests.xml" \
    tests/platforms/triton/test_triton_attention.py tests/core/test_graphs.py \
    tests/core/test_kv_cache_fp8.py tests/platforms/triton/test_triton_moe.py \
    tests/platforms/triton/test_triton_quant.py \
    > "$out/gpu_tests.log" 2>&1 || status=1
tail -25 "$out/gpu_tests.log"

log "end to end"
timeout 420 "$PYTHON" ci/legs/cuda/gpu_e2e.py "$out/gpu_e2e.json" > "$out/gpu_e2e.log" 2>&1 \
    || status=1
tail -40 "$out/gpu_e2e.log"

log "exit $status"
exit $status
