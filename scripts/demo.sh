#!/usr/bin/env bash
# Run the gstream demo server (in-memory broker, no Redis) and print its URL.
# Usage: bash scripts/demo.sh [--host 127.0.0.1] [--port 8000]
source "$(dirname "$0")/_env.sh"
ensure_venv "demo"
exec "$PY" -m gstream demo "$@"
