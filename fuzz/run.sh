#!/usr/bin/env bash
# Run an atheris fuzz target for a bounded time (not part of CI).
# Usage: bash fuzz/run.sh sse|websocket [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_env.sh
ensure_venv "test"
"$PY" -m pip install -q atheris
target="${1:-sse}"; secs="${2:-60}"
mkdir -p "fuzz/corpus/$target"
exec "$PY" "fuzz/fuzz_${target}.py" "fuzz/corpus/$target" -max_total_time="$secs"
