#!/usr/bin/env bash
# The serving table of the README: `pllm serve` against llama.cpp's
# llama-server on the same weights (fp32: pllm with --quantization none, as
# the default model is otherwise kept in its Q4_1 blocks; llama-server keeps its default f16
# KV cache), the throughput workload's 64 mixed requests streamed with
# ignore_eos under Poisson arrivals at each rate, a fresh server for every
# (server, rate). pllm runs with its serving default (--target-itl-ms 800),
# with a tighter --target-itl-ms 400, and with --target-itl-ms 0 (a fixed
# 2,048-token step budget), to show what the step-latency target changes.
#
#   ci/bench/serve_vs_llama_server.sh [OUT.json] [RATE ...]   (default rates: 0.5 1 inf)
#
# PLLM_BENCH_ISA=avx2 runs both servers on an AVX-512 host's AVX2 paths only:
# llama-server built for AVX2, and pllm under ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2 and its kernels built
# for x86-64-v3 (PLLM_CPU_MARCH); each run records these under machine.isa_caps.
# That is the AVX2 code on this core, not an AVX2 machine.
#
# Builds llama-server on first use (ci/bench/llama_server.sh: about 15 minutes
# on two cores, then cached); the benchmark itself takes about 25 minutes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/docs/results/cpu-serve-vs-llama-server.json}"
shift || true
RATES=("$@")
[ ${#RATES[@]} -gt 0 ] || RATES=(0.5 1 inf)

eval "$("$ROOT/ci/bench/llama_server.sh")"
if [ "${PLLM_BENCH_ISA:-native}" = avx2 ]; then
    export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        PLLM_CPU_MARCH=x86-64-v3
fi
PLLM="$ROOT/.venv/bin/pllm"
PY="$ROOT/.venv/bin/python"
# pllm's kernels for these flags, built (once) before any server is timed.
"$PY" -c 'from pllm.platforms.cpu.kernels import cpu_ops; assert cpu_ops() is not None'

"$PLLM" bench serve --request-rate "${RATES[@]}" --num-prompts 64 \
    --max-seconds 200 --drain-seconds 120 \
    --launch pllm --pllm-args "--quantization none --kv-cache-memory 2GiB --target-itl-ms 800" \
    --launch-command "pllm-itl-400=$PY -m pllm.entrypoints.cli serve --quantization none --kv-cache-memory 2GiB --target-itl-ms 400 --host {host} --port {port}" \
    --launch-command "pllm-fixed-budget=$PY -m pllm.entrypoints.cli serve --quantization none --kv-cache-memory 2GiB --target-itl-ms 0 --host {host} --port {port}" \
    --launch-command "llama-server=$LLAMA_SERVER -m $GGUF_F32 --alias SmolLM2-135M-Instruct --host {host} --port {port} -np 16 -c 16384 -t 2 -tb 2" \
    --output-json "$OUT" --no-plot

# The results name this checkout's and the cache's folders relatively.
sed -i -e "s#$ROOT/##g" -e "s#$HOME/#~/#g" "$OUT"
