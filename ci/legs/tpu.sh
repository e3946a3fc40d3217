#!/usr/bin/env bash
# leg-hardware: a Cloud TPU VM (v4, v5e, v5p, v6e: TPU chips under /dev/accel* or /dev/vfio)
# leg-env: ~/.cache/pllm-ci/tpu: torch + torch_xla[tpu] ($PLLM_TPU_SPEC), pllm editable
# leg-checks: pllm platforms --check tpu; greedy parity on --device tpu (ci/legs/parity.py); a small throughput benchmark
# leg-runner: [self-hosted, tpu-v5e]
#
# The tpu platform on the chip: torch-xla's Pallas ragged paged-attention
# kernel compiled by Mosaic, bf16, XLA's TPU compiler. Everything else of the
# XLA path is proven without a TPU by the xla leg; this leg has not yet run
# on a TPU.
LEG=tpu
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() {
    if ! compgen -G "/dev/accel*" >/dev/null && ! compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
        echo "needs a TPU host (no /dev/accel* or /dev/vfio/N)"
    fi
}
leg_gate why_not_here

TPU_SPEC="${PLLM_TPU_SPEC:-torch==2.9.0 torch_xla[tpu,pallas]==2.9.0 -f https://storage.googleapis.com/libtpu-releases/index.html}"
# shellcheck disable=SC2086  # the spec carries pip options
cached_env_leg tpu $TPU_SPEC
