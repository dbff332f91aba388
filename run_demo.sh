#!/usr/bin/env bash
# End to end on the bundled example CNN: set up, build the model, compile it for
# this CPU, check it against ONNX Runtime, print the plan and latencies.
set -euo pipefail
cd "$(dirname "$0")"
SONIQ_EXTRAS=dev bash scripts/setup_env.sh
exec .venv/bin/python -m soniq_tvm.demo "$@"
