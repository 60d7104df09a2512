#!/usr/bin/env bash
# Run the whole gstream test suite: lint (ruff), types (mypy), pytest, the API reference.
# Installs everything it needs itself (virtualenv, packages, Debian packages).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k broker
source "$(dirname "$0")/_env.sh"
ensure_venv "test,flask,django,gunicorn,redis,locust,browser"
apt_install redis-server redis-sentinel chromium nginx caddy
cd "$ROOT"
echo ">> ruff"
lint_dirs=()
for d in gstream tests examples bench loadtests; do [ -d "$d" ] && lint_dirs+=("$d"); done
"$VENV/bin/ruff" check "${lint_dirs[@]}"
echo ">> mypy"
"$VENV/bin/mypy" gstream
echo ">> pytest"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
[ $rc -eq 0 ] || exit $rc
bash "$ROOT/scripts/docs.sh"  # the API reference, warnings as errors

# gstream declares websockets>=13 so Python 3.10 users are served: run the
# WebSocket suites again on the oldest supported release.
echo ">> pytest (websockets 13.1, the oldest supported)"
OLD="$ROOT/.venv-ws13"
if [ ! -x "$OLD/bin/python" ]; then
    python3 -m venv "$OLD"
fi
old_want="$(cat "$ROOT/setup.py" "$ROOT/scripts/test.sh" | sha256sum | cut -c1-16)"
if [ "$(cat "$OLD/.stamp" 2>/dev/null)" != "$old_want" ]; then
    "$OLD/bin/python" -m pip install -q -e "$ROOT[test]" "websockets==13.1" 2>&1 | { grep -v "^WARNING: Location" || true; }
    echo "$old_want" > "$OLD/.stamp"
fi
"$OLD/bin/python" -c "import websockets; assert websockets.__version__.startswith('13.'), websockets.__version__"
"$OLD/bin/python" -m pytest -q -p no:locust tests/test_websocket.py tests/test_websocket_hostile.py \
    tests/test_websocket_keepalive.py tests/test_client_ws.py tests/test_hub.py tests/test_hub_slow.py \
    tests/test_hub_batching.py tests/test_ws_callbacks.py tests/test_ws_tls.py tests/test_websocket_edges.py

# Each extra must install what its code imports: the test virtualenv above
# has every extra at once, which hides a missing dependency.
echo ">> each extra alone from the built wheel"
bash "$ROOT/scripts/check_extras.sh"
