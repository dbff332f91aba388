#!/usr/bin/env bash
# Create (or reuse) .venv and install soniq-tvm with the extras named in $SONIQ_EXTRAS.
# Sourced by run_demo.sh and run_tests.sh; safe to run again (pip skips what is there).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
    "$py" -m venv "$root/.venv"
fi
"$root/.venv/bin/python" -m pip install -q --upgrade pip
"$root/.venv/bin/python" -m pip install -q -e "$root[${SONIQ_EXTRAS:-dev}]"
