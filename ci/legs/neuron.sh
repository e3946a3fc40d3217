#!/usr/bin/env bash
# leg-hardware: an AWS Trainium or Inferentia2 instance (trn1, trn2, inf2: /dev/neuron0) with the Neuron driver
# leg-env: ~/.cache/pllm-ci/neuron: torch-neuronx + neuronx-cc from AWS's package repository ($PLLM_NEURON_SPEC), pllm editable
# leg-checks: pllm platforms --check neuron; greedy parity on --device neuron (ci/legs/parity.py); a small throughput benchmark
# leg-runner: [self-hosted, trn1]
#
# The neuron platform on the chip: the shared XLA path compiled by
# neuronx-cc, the torch paged attention (until an NKI kernel plugs in).
# Everything but the Neuron SDK's part is proven without the chip by the xla
# leg; this leg has not yet run on a Neuron host.
LEG=neuron
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() {
    if ! compgen -G "/dev/neuron[0-9]*" >/dev/null; then
        echo "needs an AWS Trainium/Inferentia host (no /dev/neuron0)"
    fi
}
leg_gate why_not_here

NEURON_SPEC="${PLLM_NEURON_SPEC:-torch-neuronx neuronx-cc==2.* --extra-index-url https://pip.repos.neuron.amazonaws.com}"
# shellcheck disable=SC2086  # the spec carries pip options
cached_env_leg neuron $NEURON_SPEC
