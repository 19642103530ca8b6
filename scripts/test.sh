#!/usr/bin/env bash
# Set everything up (QEMU included) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# two workers (the machine has 2 cores; one process leaves a core idle half the time
# while it waits on qemu-img and QEMU), tests handed out as workers free up
exec .venv/bin/python -m pytest -p no:cacheprovider -n 2 --dist worksteal tests "$@"
