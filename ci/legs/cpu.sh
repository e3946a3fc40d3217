#!/usr/bin/env bash
# leg-hardware: any x86-64 or arm64 Linux host (2 cores are enough)
# leg-env: .venv from ./install.sh (CPU torch, pllm editable, the default model)
# leg-checks: pllm platforms --check cpu; greedy parity on tiny random models (tests/models/test_parity_tiny.py); a small throughput benchmark on the default model
# leg-runner: ubuntu-latest
#
# The CPU platform: the conformance suite, greedy parity with transformers on
# tiny random models of every architecture in every engine setting, and a
# throughput smoke run of `pllm bench` on the default model (a handful of
# short requests: it proves the benchmark path, the figure is not a result).
LEG=cpu
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() { :; }  # every host runs it
leg_gate why_not_here

ensure_repo_venv
check conformance .venv/bin/pllm platforms --check cpu
check parity "$VENV_PY" -m pytest -q -p no:cacheprovider tests/models/test_parity_tiny.py
check bench bench_smoke "$VENV_PY" cpu
leg_finish
