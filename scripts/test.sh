#!/usr/bin/env bash
# Run the whole gstream test suite: lint (ruff), types (mypy), then pytest.
# Installs everything it needs itself (virtualenv, packages, Debian packages).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k broker
source "$(dirname "$0")/_env.sh"
ensure_venv "test,flask,django,gunicorn,redis,locust,browser"
apt_install redis-server chromium
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
exit $rc
