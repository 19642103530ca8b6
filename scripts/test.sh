#!/usr/bin/env bash
# Set everything up (QEMU included) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec .venv/bin/python -m pytest -p no:cacheprovider tests "$@"
