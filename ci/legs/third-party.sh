#!/usr/bin/env bash
# leg-hardware: any Linux host (the example accelerator is the host CPU)
# leg-env: a throwaway venv that sees .venv's packages and gets tests/plugins/pllm-fakeaccel pip-installed (.venv itself is never changed)
# leg-checks: the plugin is discovered as third-party; pllm platforms --check fakeaccel; greedy parity on --device fakeaccel (ci/legs/parity.py)
# leg-runner: ubuntu-latest
#
# A platform plugin installed the way a vendor's is: its own distribution
# with a `pllm.platforms` entry point. The throwaway venv lies in
# $PLLM_CI_OUT/third-party/venv and is made again on every run; a .pth file
# puts .venv's site-packages (pllm editable, torch, ...) behind its own, so
# nothing is downloaded and the plugin never lands in .venv. (A venv made with
# --system-site-packages from .venv's python would see the base interpreter's
# packages, not .venv's: hence the .pth file.)
LEG=third-party
LEG_ARG="${1:-}"
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

why_not_here() { :; }  # every host runs it
leg_gate why_not_here
ensure_repo_venv

VENV="$LEG_OUT/venv"
PY="$VENV/bin/python"
make_env() {
    rm -rf "$VENV" "$LEG_OUT/src"
    "$VENV_PY" -m venv --without-pip "$VENV"
    local own base
    own="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    base="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir, not a bare path: .venv's own .pth files (the editable pllm) must run too.
    echo "import site; site.addsitedir('$base')" > "$own/zz-pllm-ci-base.pth"
    # Build from a copy, so the build leaves nothing in tests/.
    cp -r tests/plugins/pllm-fakeaccel "$LEG_OUT/src"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index "$LEG_OUT/src"
    "$PY" - "$ROOT" <<'PY'
import importlib.metadata as md, os, sys
import pllm
dist = md.distribution("pllm-fakeaccel")
print("pllm-fakeaccel", dist.version, "installed in", dist.locate_file(""))
assert os.path.realpath(str(dist.locate_file(""))).startswith(os.path.realpath(sys.prefix)), \
    "pllm-fakeaccel did not land in the throwaway venv"
print("pllm from", pllm.__file__)
assert os.path.realpath(pllm.__file__).startswith(os.path.realpath(sys.argv[1])), \
    "pllm does not come from this checkout"
PY
}
check env make_env
[ "$LEG_FAILED" = 0 ] || { leg_finish || true; exit 1; }

discovered() {  # listed with its distribution as origin and a score above 0 (available)
    local table
    table="$("$PY" -m pllm.entrypoints.cli platforms)" || return 1
    echo "$table" >&2
    # Not `... | grep -q` under pipefail: grep exits at its first match and the
    # writer's SIGPIPE would fail the check.
    grep -Eq '^[ *]+fakeaccel +pllm-fakeaccel [^ ]+ +[0-9]+ +[1-9][0-9]* ' <<<"$table"
}
check discovery discovered
check conformance "$PY" -m pllm.entrypoints.cli platforms --check fakeaccel
check parity "$PY" ci/legs/parity.py --device fakeaccel
not_in_repo_venv() {
    if "$VENV_PY" -c "import importlib.metadata as m; m.distribution('pllm-fakeaccel')" 2>/dev/null
    then echo "pllm-fakeaccel is installed in .venv"; return 1; fi
}
check venv-clean not_in_repo_venv
leg_finish
