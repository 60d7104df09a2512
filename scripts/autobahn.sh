#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient against a gstream echo server
# (scripts/autobahn_echo.py: compression on, 16 MiB messages, keepalive off)
# and print the summary. Not part of scripts/test.sh: the full run takes ~8 min
# (tests/test_autobahn.py runs a quick subset when GSTREAM_AUTOBAHN=1).
#
# Usage: bash scripts/autobahn.sh [OUTDIR] [CASES]
#   OUTDIR  reports (default: $ROOT/.autobahn-reports); OUTDIR/index.html is the upstream report
#   CASES   comma-separated case patterns (default "*": all 517 cases)
# Environment:
#   AUTOBAHN_TOOL  the Python 3 port of the suite (default /work/shared/tools/autobahn)
#   AUTOBAHN_VENV  where it is installed (default $ROOT/.venv-autobahn; installed when missing)
#   EXCLUDE        patterns to skip, e.g. EXCLUDE="9.*,12.*,13.*" (~15 s quick run)
#   PORT           the echo server's port (default: a free one)
#   PYTHON         the interpreter with gstream installed (default $ROOT/.venv/bin/python)
# Exit: that of the tool's run.sh: 0 no case FAILED, 1 some FAILED, 2 the run went wrong.
# The heavy full run belongs under the shared lock: flock /tmp/gstream-bench.lock bash scripts/autobahn.sh
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shared/ lies beside the checkout (CI's clone too); /work/shared is the developers' copy.
TOOL="${AUTOBAHN_TOOL:-}"
if [ -z "$TOOL" ]; then
  TOOL="$ROOT/../shared/tools/autobahn"
  [ -x "$TOOL/run.sh" ] || TOOL=/work/shared/tools/autobahn
fi
export AUTOBAHN_VENV="${AUTOBAHN_VENV:-$ROOT/.venv-autobahn}"
OUTDIR="${1:-$ROOT/.autobahn-reports}"
CASES="${2:-*}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$TOOL/run.sh" ] || { echo "autobahn.sh: no Autobahn tool at $TOOL (set AUTOBAHN_TOOL)" >&2; exit 2; }
if [ ! -x "$AUTOBAHN_VENV/bin/wstest" ]; then
  "$TOOL/install.sh" "$AUTOBAHN_VENV" >&2 || { echo "autobahn.sh: install failed" >&2; exit 2; }
fi
PORT="${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$OUTDIR"
"$PY" "$ROOT/scripts/autobahn_echo.py" --port "$PORT" > "$OUTDIR/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null' EXIT
"$TOOL/run.sh" 127.0.0.1 "$PORT" "$OUTDIR" "$CASES"
RC=$?
if ! kill -0 "$SERVER" 2>/dev/null; then
  echo "autobahn.sh: the echo server died during the run (see $OUTDIR/server.log)" >&2
  RC=2
fi
exit $RC
