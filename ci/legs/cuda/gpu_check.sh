#!/usr/bin/env bash
# GPU proof of the Triton PagedAttention kernels (cuda platform; rocm reuses them).
#
#   ci/legs/cuda/gpu_check.sh [SUMMARY_JSON] [extra gpu_check.py options]
#
# Needs only torch (CUDA build) and triton; pllm is used from this checkout
# (PYTHONPATH), not installed. Prints progress with timestamps and writes a JSON
# summary (default: ./gpu_check_summary.json). Exit status: 0 pass, 1 a
# correctness check failed, 2 no usable GPU / setup error. Typically < 3 min.
set -uo pipefail

summary="${1:-gpu_check_summary.json}"
shift || true
mkdir -p "$(dirname "$summary")"
summary="$(cd "$(dirname "$summary")" && pwd)/$(basename "$summary")"

cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET  # compiled kernels, never the interpreter
PYTHON="${PYTHON:-python3}"

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
else
    echo "nvidia-smi not found (continuing; torch decides whether a GPU is usable)"
fi
"$PYTHON" - <<'PY' || echo "== gpu_check: torch/triton import failed; gpu_check.py records why"
import torch, triton
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, "
      f"cuda available: {torch.cuda.is_available()}")
PY

"$PYTHON" ci/legs/cuda/gpu_check.py "$summary" "$@"
rc=$?
echo "== gpu_check: exit $rc, summary: $summary"
exit $rc
