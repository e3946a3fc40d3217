# Shared by the legs in ci/legs/*.sh (sourced, not run). A leg:
#
#   ci/legs/NAME.sh               run it: exit 0 pass, 1 fail, 3 not runnable here
#   ci/legs/NAME.sh --can-run     exit 0 if this machine can run it, else 3 with the reason
#
# and prints exactly one final line, `LEG NAME: PASS|FAIL|SKIP ...`. Each
# check's full output goes to $PLLM_CI_OUT/NAME/<check>.log; the console gets
# one line per check (and the log's tail when it fails).
#
# Header lines the matrix reads (`ci/matrix list`):
#   # leg-hardware: what the machine needs
#   # leg-env: the environment the leg builds or reuses
#   # leg-checks: what it runs
#   # leg-runner: the hosted-CI runner labels (.github/workflows/ci.yml)

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
LEG_NOT_HERE=3
LEG_START=$SECONDS
LEG_FAILED=0
LEG_OUT="${PLLM_CI_OUT:-${TMPDIR:-/tmp}/pllm-ci}/$LEG"
mkdir -p "$LEG_OUT"
LEG_RESULTS="$LEG_OUT/.results"  # NAME=VALUE lines, in order: the summary line
: >"$LEG_RESULTS"
VENV_PY="$ROOT/.venv/bin/python"

log() { echo "== $LEG $(date -u +%H:%M:%S): $*"; }

# leg_gate REASON_FUNCTION: with --can-run, report and exit; when
# not runnable, print the SKIP line and exit 3. REASON_FUNCTION prints why the
# leg cannot run here (nothing when it can).
leg_gate() {
    local why
    why="$("$1")" || true
    if [ "${LEG_ARG:-}" = "--can-run" ]; then
        if [ -n "$why" ]; then echo "$why"; exit "$LEG_NOT_HERE"; fi
        echo "runnable here"; exit 0
    fi
    if [ -n "$why" ]; then leg_skip "$why"; fi
}

leg_skip() {  # leg_skip REASON
    echo "LEG $LEG: SKIP $1: run ci/legs/$LEG.sh there"
    exit "$LEG_NOT_HERE"
}

# check NAME COMMAND...: run one check, its output in $LEG_OUT/NAME.log;
# records NAME=ok or NAME=FAIL for the summary line (a result already set with
# `result NAME VALUE` while the check ran, e.g. a throughput, wins over "ok").
# COMMAND runs in a subshell under `set -e`, so a shell function fails at its
# first failing command; variables it sets do not reach the leg.
check() {
    local name="$1" t0=$SECONDS rc
    shift
    set +e
    (set -e; "$@") >"$LEG_OUT/$name.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" = 0 ]; then
        log "$name: ok ($((SECONDS - t0)) s)"
        [ -n "$(result_of "$name")" ] || result "$name" ok
    else
        log "$name: FAILED with exit $rc ($((SECONDS - t0)) s); last lines of $LEG_OUT/$name.log:"
        tail -n 40 "$LEG_OUT/$name.log" | sed 's/^/    /'
        result "$name" FAIL
        LEG_FAILED=1
    fi
}

result() {  # result NAME VALUE (replaces an earlier value, keeping its place)
    local line found=0 kept=()
    while IFS= read -r line; do
        if [ "${line%%=*}" = "$1" ]; then line="$1=$2" found=1; fi
        kept+=("$line")
    done <"$LEG_RESULTS"
    [ "$found" = 1 ] || kept+=("$1=$2")
    printf '%s\n' "${kept[@]}" >"$LEG_RESULTS"
}

result_of() {  # result_of NAME: its value, if any
    sed -n "s/^$1=//p" "$LEG_RESULTS"
}

leg_finish() {
    local status=PASS
    [ "$LEG_FAILED" = 0 ] || status=FAIL
    echo "LEG $LEG: $status $(tr '\n' ' ' <"$LEG_RESULTS")($((SECONDS - LEG_START)) s)"
    [ "$LEG_FAILED" = 0 ]
}

# The repository's .venv, made by ./install.sh: reused when it exists (set
# PLLM_CI_INSTALL=1 to run install.sh anyway), built when it does not.
ensure_repo_venv() {
    if [ "${PLLM_CI_INSTALL:-0}" = 1 ] || [ ! -x "$ROOT/.venv/bin/pllm" ]; then
        check install ./install.sh
        [ "$LEG_FAILED" = 0 ] || { leg_finish || true; exit 1; }
    else
        log "reusing .venv (PLLM_CI_INSTALL=1 runs ./install.sh first)"
    fi
}

# json_field FILE EXPR: a value from a JSON file (EXPR is Python on `d`).
json_field() {
    "${PYTHON:-$VENV_PY}" -c 'import json, sys
d = json.load(open(sys.argv[1]))
print(eval(sys.argv[2]))' "$1" "$2"
}

# bench_smoke PYTHON DEVICE: a few short requests of `pllm bench throughput` on
# the default model; proves the benchmark path (the figure is not a result)
# and puts useful output tokens/s into the summary line. Call through check.
bench_smoke() {
    local json="$LEG_OUT/bench-throughput.json"
    rm -f "$json"
    "$1" -m pllm.entrypoints.cli bench throughput --device "$2" --num-prompts 4 \
        --input-len-range 16,32 --output-len-range 8,16 --max-model-len 128 \
        --kv-cache-memory 64MiB --output-json "$json" --no-plot
    result bench "$(PYTHON="$1" json_field "$json" \
        'round(d["pllm"]["useful_output_tokens_per_s"], 1)')tok/s"
}

cache_dir() {  # cache_dir NAME: where a leg's own environment lives
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/pllm-ci/$1"
}

# cache_env NAME PIP_ARGS...: the venv $(cache_dir NAME), made when missing
# (its packages from PIP_ARGS, then pllm editable from this checkout); never
# .venv. PLLM_CI_REBUILD=1 makes it again. Run it through check.
cache_env() {
    local name="$1" dir ENV_PY
    shift
    dir="$(cache_dir "$name")"
    ENV_PY="$dir/bin/python"
    if [ "${PLLM_CI_REBUILD:-0}" = 1 ] || [ ! -f "$dir/.complete" ]; then
        log "building $dir"
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$ENV_PY" -m pip install -q --upgrade pip
        "$ENV_PY" -m pip install -q "$@"
        "$ENV_PY" -m pip install -q -e ".[test,bench]"
        touch "$dir/.complete"
    else
        log "reusing $dir (PLLM_CI_REBUILD=1 makes it again)"
    fi
}

# The tail every platform leg with a cached environment of its own shares
# (tpu, neuron, ipex): build or reuse the environment from SPEC (pip
# arguments), then the conformance suite, greedy parity and the bench smoke
# run on --device DEVICE; the leg's exit status is leg_finish's.
cached_env_leg() {  # cached_env_leg DEVICE SPEC...
    local device=$1
    shift
    ENV_PY="$(cache_dir "$device")/bin/python"
    check env cache_env "$device" "$@"
    [ "$LEG_FAILED" = 0 ] || { leg_finish || true; exit 1; }
    check conformance "$ENV_PY" -m pllm.entrypoints.cli platforms --check "$device"
    check parity "$ENV_PY" ci/legs/parity.py --device "$device"
    check bench bench_smoke "$ENV_PY" "$device"
    leg_finish
}
