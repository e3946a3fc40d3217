#!/usr/bin/env bash
# Batch-1 decode of the default model (SmolLM2-135M-Instruct) against
# llama.cpp's llama-bench on the same machine in the same run, 2 threads each:
#
#   llama.cpp   tg128 (128 tokens decoded from an empty context) on the model's
#               own Q4_1 file and on an F32 GGUF of the same values
#   pllm        `pllm bench latency` (a 128-token prompt, then 128 tokens) with
#               the Q4_1 blocks kept (--quantization gguf; fp32 activations,
#               then 8-bit ones with PLLM_GGUF_ACTIVATIONS=q8) and dequantized
#               (--quantization none), and rounded to per-channel int8 at load
#               (--quantization int8; compared with llama.cpp's F32 run)
#
# and prints each figure with its ratio to llama.cpp's on the same weights.
#
#   ci/bench/latency_vs_llama_cpp.sh [OUT.json]
#   (default docs/results/cpu-gguf-latency-vs-llama-cpp.json)
#
# Builds llama-bench on first use (ci/bench/llama_server.sh, cached).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/docs/results/cpu-gguf-latency-vs-llama-cpp.json}"
PLLM="$ROOT/.venv/bin/pllm"
PY="$ROOT/.venv/bin/python"
THREADS="${PLLM_BENCH_THREADS:-2}"

eval "$("$ROOT/ci/bench/llama_server.sh")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "llama-bench tg128, $THREADS threads: Q4_1, then F32" >&2
"$LLAMA_BENCH" -m "$GGUF_Q4_1" -m "$GGUF_F32" -p 0 -n 128 -t "$THREADS" -r 3 -o json \
    >"$WORK/llama.json" 2>"$WORK/llama.err" || { cat "$WORK/llama.err" >&2; exit 1; }

run_pllm() {  # NAME ENV... -- ARGS...
    local name="$1"; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    echo "pllm bench latency: $name" >&2
    env "${envs[@]}" "$PLLM" bench latency --input-len 128 --output-len 128 --num-iters 3 \
        --kv-cache-memory 512MiB --num-threads "$THREADS" --no-plot \
        --output-json "$WORK/pllm-$name.json" "$@" >"$WORK/pllm-$name.log" 2>&1 \
        || { tail -n 30 "$WORK/pllm-$name.log" >&2; exit 1; }
}
run_pllm gguf-fp32 PLLM_GGUF_ACTIVATIONS=fp32 -- --quantization gguf
run_pllm gguf-q8 PLLM_GGUF_ACTIVATIONS=q8 -- --quantization gguf
run_pllm none PLLM_GGUF_ACTIVATIONS=fp32 -- --quantization none
run_pllm int8 PLLM_GGUF_ACTIVATIONS=fp32 -- --quantization int8

"$PY" - "$WORK" "$OUT" <<'PY'
import json, os, platform, sys

work, out = sys.argv[1:3]
llama = {}
for row in json.load(open(f"{work}/llama.json")):
    kind = "Q4_1" if "Q4_1" in os.path.basename(row["model_filename"]) else "F32"
    llama[kind] = {"tokens_per_s": row["avg_ts"], "stddev": row["stddev_ts"],
                   "model_type": row["model_type"], "model_size_bytes": row["model_size"],
                   "cpu_info": row.get("cpu_info"), "build": row.get("build_commit")}
rows, pllm = [], {}
for name, weights in (("gguf-fp32", "Q4_1"), ("gguf-q8", "Q4_1"), ("none", "F32"),
                      ("int8", "F32")):
    result = json.load(open(f"{work}/pllm-{name}.json"))
    figures = result.get("pllm", result)
    tps = figures["decode_tokens_per_s"] if "decode_tokens_per_s" in figures else \
        1.0 / figures["time_per_output_token_s"]
    pllm[name] = {"decode_tokens_per_s": tps, "result": result}
    base = llama[weights]["tokens_per_s"]
    rows.append((f"pllm --quantization {name.split('-')[0]}"
                 + (f" ({name.split('-')[1]} activations)" if "-" in name else ""),
                 weights, tps, base, tps / base))
print(f"{'engine':46s} {'weights':7s} {'tokens/s':>9s} {'llama.cpp':>10s} {'ratio':>6s}")
for kind in ("Q4_1", "F32"):
    print(f"{'llama.cpp llama-bench tg128':46s} {kind:7s} {llama[kind]['tokens_per_s']:9.1f}")
for name, weights, tps, base, ratio in rows:
    print(f"{name:46s} {weights:7s} {tps:9.1f} {base:10.1f} {ratio:6.2f}")
json.dump({"machine": platform.processor() or platform.machine(), "llama_cpp": llama,
           "pllm": pllm, "ratios": {r[0]: r[4] for r in rows}}, open(out, "w"), indent=2)
print(f"results: {out}")
PY
# The results name this checkout's and the cache's folders relatively, and
# the per-run files by their names alone.
sed -i -e "s#$WORK/##g" -e "s#$ROOT/##g" -e "s#$HOME/#~/#g" "$OUT"
