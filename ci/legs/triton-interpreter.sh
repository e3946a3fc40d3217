#!/usr/bin/env bash
# leg-hardware: any Linux host: the cuda/rocm Triton kernels run on CPU tensors under TRITON_INTERPRET=1
# leg-env: .venv from ./install.sh (triton comes with the test extra)
# leg-checks: kernel selfcheck + conformance checks of the Triton backend, interpreted (tests/platforms/triton); greedy parity with the Triton backend in the engine (ci/legs/parity.py --attention triton); the cuda leg's kernel timing script (cuda/gpu_check.py --smoke --skip-correctness)
# leg-runner: ubuntu-latest
#
# The kernels the cuda and rocm platforms share (pllm/platforms/triton),
# checked without a GPU: Triton's interpreter runs them on CPU tensors (slow,
# so the shapes are small and bf16 is left to the GPU legs). The .ci/run
# pytest run already includes tests/platforms/triton, so .ci/run does not
# run this leg again.
LEG=triton-interpreter
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() {
    if [ ! -x "$VENV_PY" ]; then
        echo "needs .venv (./install.sh)"
    elif ! "$VENV_PY" -c "import triton" >/dev/null 2>&1; then
        echo "needs triton in .venv (pip install 'pllm[test]')"
    fi
}
leg_gate why_not_here
ensure_repo_venv
export TRITON_INTERPRET=1

check conformance "$VENV_PY" -m pytest -q -p no:cacheprovider tests/platforms/triton
check parity "$VENV_PY" ci/legs/parity.py --device cpu --attention triton --archs llama,mistral \
    --max-new 8
check bench "$VENV_PY" ci/legs/cuda/gpu_check.py --smoke --skip-correctness \
    "$LEG_OUT/gpu_check_smoke.json"
[ "$(result_of bench)" = ok ] && result bench smoke
leg_finish
