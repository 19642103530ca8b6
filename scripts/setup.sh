#!/usr/bin/env bash
# Set up a virtual environment in .venv with qcow2engine installed (editable).
#   scripts/setup.sh          engine only (no QEMU needed)
#   scripts/setup.sh --test   plus QEMU (qemu-utils, qemu-system-x86) and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

PY=${PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi
if [ $want_test = 1 ]; then
    # QEMU is the oracle; a Debian kernel and busybox make the live tests' guest
    apt_install qemu-utils qemu-system-x86 linux-image-amd64 busybox-static
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# editable_mode=compat: a plain path entry, no import hook to load at every start-up
if [ $want_test = 1 ]; then
    .venv/bin/python -m pip install -q --config-settings editable_mode=compat -e '.[test]'
else
    .venv/bin/python -m pip install -q --config-settings editable_mode=compat -e .
fi
# byte-compile once (PYTHONDONTWRITEBYTECODE would otherwise recompile at every start)
.venv/bin/python -m compileall -q qcow2engine qmp_bridge >/dev/null
