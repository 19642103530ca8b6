#!/usr/bin/env bash
# Set up the engine and run it on a demo backing chain it builds itself (no QEMU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m qcow2engine.demo "$@"
