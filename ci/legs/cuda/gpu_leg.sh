# The body the cuda and rocm legs share (sourced after lib.sh, with
# GPU_PLATFORM=cuda|rocm): both run the Triton kernels through torch's cuda
# device, so the same scripts prove both.
#
# Environment, first that exists:
#   1. $PYTHON (a python with a GPU build of torch; e.g. a machine's own);
#   2. .venv, when ./install.sh was run with PLLM_TORCH_SPEC naming a GPU build;
#   3. ~/.cache/pllm-ci/$GPU_PLATFORM, built here: torch from $PLLM_TORCH_SPEC
#      (cuda: default torch==2.13.0, PyPI's Linux wheel is the CUDA build;
#      rocm: set it, e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/rocm6.4"),
#      then pllm editable with the test and bench extras.
# pllm itself is installed from this checkout without dependencies, so a
# machine with no network works when torch, triton and transformers are there.

GPU_CACHE_ENV="${XDG_CACHE_HOME:-$HOME/.cache}/pllm-ci/$GPU_PLATFORM"

gpu_torch_ok() {  # gpu_torch_ok PYTHON: a GPU build of torch for $GPU_PLATFORM that sees a GPU
    "$1" - "$GPU_PLATFORM" <<'PY' 2>/dev/null
import sys
import torch
want = sys.argv[1]
build = torch.version.hip if want == "rocm" else torch.version.cuda
sys.exit(0 if build and torch.cuda.is_available() else 1)
PY
}

gpu_python() {  # the python this leg uses (it may not exist yet: option 3)
    if [ -n "${PYTHON:-}" ]; then
        command -v "$PYTHON"
    elif [ -x "$VENV_PY" ] && gpu_torch_ok "$VENV_PY"; then
        echo "$VENV_PY"
    else
        echo "$GPU_CACHE_ENV/bin/python"
    fi
}

gpu_build_env() {
    local py
    py="$(gpu_python)"
    if [ "$py" = "$GPU_CACHE_ENV/bin/python" ] && ! { [ -x "$py" ] && gpu_torch_ok "$py"; }; then
        log "building $GPU_CACHE_ENV"
        python3 -m venv "$GPU_CACHE_ENV"
        "$py" -m pip install -q --upgrade pip
        # shellcheck disable=SC2086  # the spec may carry pip options (--index-url ...)
        "$py" -m pip install -q ${PLLM_TORCH_SPEC:-torch==2.13.0}
        "$py" -m pip install -q -e ".[$GPU_PLATFORM,test,bench]"
    fi
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        || log "pip install -e . failed: the leg uses the checkout through PYTHONPATH"
    gpu_torch_ok "$py" || { echo "$py: torch is not a $GPU_PLATFORM build that sees a GPU"; return 1; }
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

gpu_leg_run() {
    unset TRITON_INTERPRET
    export PYTHON
    PYTHON="$(gpu_python)"
    check env gpu_build_env
    [ "$LEG_FAILED" = 0 ] || { leg_finish || true; exit 1; }
    if ! "$PYTHON" -c "import importlib.metadata as m; m.distribution('pllm')" 2>/dev/null; then
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # not installed: the checkout
    fi
    check conformance "$PYTHON" -m pllm.entrypoints.cli platforms --check "$GPU_PLATFORM"
    # Compiled kernels against the reference (fp32/fp16/bf16, large shapes), then timing.
    check kernels ci/legs/cuda/gpu_check.sh "$LEG_OUT/gpu_check.json"
    # GPU tests, then greedy parity and throughput vs HF transformers (gpu_e2e.py).
    check gpu-checks ci/legs/cuda/gpu_checks.sh "$LEG_OUT/gpu_checks"
    local e2e="$LEG_OUT/gpu_checks/gpu_e2e.json"
    if [ -f "$e2e" ]; then
        if [ "$(json_field "$e2e" 'd.get("parity_ok")')" = True ]; then
            result parity ok
        else
            result parity FAIL
            LEG_FAILED=1
        fi
        result bench "x$(json_field "$e2e" 'round(d["throughput_ratio"], 1)')vsHF"
    else
        result parity missing
        LEG_FAILED=1
    fi
    leg_finish
}
