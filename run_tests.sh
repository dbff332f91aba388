#!/usr/bin/env bash
# The whole test suite (about 10 minutes on 2 cores), in a fresh or reused .venv.
set -euo pipefail
cd "$(dirname "$0")"
SONIQ_EXTRAS=dev,torch bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
