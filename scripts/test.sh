#!/usr/bin/env bash
# Runs the test suite; on Linux with OpenBLAS installed, MLX gets it preloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [ "$(uname -s)" = "Linux" ] && [ -e "$OPENBLAS" ]; then
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec python -m pytest -q "$@"
