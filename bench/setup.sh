#!/usr/bin/env bash
# Benchmark set-up (not needed by the test suite): the Python peers (pip extra
# "bench") in .venv, and the Go net/http reference server's toolchain from
# Debian (golang-go, golang-github-gorilla-websocket-dev: the Go build is
# offline, no module proxy). Without Go the runner skips that server with a
# message. Safe to run any number of times.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/_env.sh"
if command -v apt-get >/dev/null 2>&1; then
    apt_install golang-go golang-github-gorilla-websocket-dev
else
    echo ">> no apt-get: install Go and gorilla/websocket by hand, or bench/run.py skips gonethttp"
fi
ensure_venv "bench"
"$PY" "$ROOT/bench/servers/gonethttp_server.py" --build >/dev/null && echo ">> Go reference server built"
