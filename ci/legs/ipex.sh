#!/usr/bin/env bash
# leg-hardware: an Intel Xeon (4th gen or later for AMX; any AVX-512 Xeon runs it)
# leg-env: ~/.cache/pllm-ci/ipex: torch 2.8 (CPU build) + intel-extension-for-pytorch 2.8 ($PLLM_IPEX_SPEC), pllm editable; never .venv (IPEX pins its torch)
# leg-checks: pllm platforms --check ipex; greedy parity on --device ipex (ci/legs/parity.py); a small throughput benchmark
# leg-runner: [self-hosted, intel-xeon-amx]
#
# The ipex platform (Intel's extension on Intel CPUs) needs its own torch,
# hence its own environment, built on the first run (about 2 GB).
LEG=ipex
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() {
    if ! grep -q GenuineIntel /proc/cpuinfo 2>/dev/null; then
        echo "needs an Intel Xeon host (this CPU is $(grep -m1 vendor_id /proc/cpuinfo 2>/dev/null \
            | sed 's/.*: //' || echo unknown))"
    elif [ ! -d "$ROOT/pllm/platforms/ipex" ]; then
        echo "needs the ipex platform plugin (pllm/platforms/ipex is not written yet)"
    fi
}
leg_gate why_not_here

IPEX_SPEC="${PLLM_IPEX_SPEC:-torch==2.8.0 intel-extension-for-pytorch==2.8.0 --extra-index-url https://download.pytorch.org/whl/cpu}"
# shellcheck disable=SC2086  # the spec carries pip options
cached_env_leg ipex $IPEX_SPEC
