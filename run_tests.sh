#!/usr/bin/env bash
# The whole test suite (15-20 minutes on 2 cores, by host), in a fresh or reused .venv.
# Test files run on $SONIQ_TEST_WORKERS processes (pytest-xdist, default 2; 1 runs them in this one),
# a whole file per process so its module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")"
SONIQ_EXTRAS=dev,torch bash scripts/setup_env.sh
workers="${SONIQ_TEST_WORKERS:-2}"
if [ "$workers" = "1" ]; then
    exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
