#!/usr/bin/env bash
# Each extra installs what its code imports: build the wheel once, then for
# the core and for each extra make a fresh virtualenv, install ONLY
# "gstream-*.whl[extra]" into it and import that extra's modules (for
# gunicorn, load the worker classes the way `gunicorn -k` does). A test
# virtualenv hides a missing dependency (it has everything); this does not.
# Uses pip's cache, so a rerun takes about a minute.
# Usage: bash scripts/check_extras.sh [extra ...]   (default: all of them)
source "$(dirname "$0")/_env.sh"
cd "$ROOT"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gstream-extras.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Build from a copy of the tracked (and new, unignored) files: a stale build/
# in the tree could put deleted modules into the wheel.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src" 2>/dev/null || true
python3 -m venv "$WORK/builder"
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; return "${PIPESTATUS[0]}"; }
quiet "$WORK/builder/bin/python" -m pip install -q --disable-pip-version-check "setuptools>=61" wheel
quiet "$WORK/builder/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
    --no-build-isolation -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/gstream-*.whl)"
PIP="$WORK/builder/bin/pip"
echo ">> built $(basename "$WHEEL")"

# What each extra must make importable. "core" is the wheel with no extra:
# every gstream module not listed under an extra must import there.
declare -A MODULES=(
    [core]=""
    [redis]="gstream.backplane.redis gstream.backplane.redis_hub gstream.backplane.redis_publisher gstream.backplane.redis_presence gstream.backplane._redisutil"
    [locust]="gstream.locust gstream.contrib.locust gstream.contrib.locust._base gstream.contrib.locust._sse gstream.contrib.locust._ws"
    [flask]="gstream.contrib.flask"
    [django]="gstream.contrib.django"
    [gunicorn]="gstream.contrib.gunicorn"
)
EXTRA_ONLY="${MODULES[*]}"

check() {
    local extra="$1" venv="$WORK/venv-$1" spec="$WHEEL"
    [ "$extra" = core ] || spec="$WHEEL[$extra]"
    # No pip of its own (ensurepip costs ~4 s a venv): the builder's pip installs into it.
    python3 -m venv --without-pip "$venv"
    quiet "$PIP" --python "$venv/bin/python" install -q --disable-pip-version-check "$spec" \
        || { echo "pip install $spec failed" >&2; return 1; }
    # Run from the venv, not the source tree, so the wheel's copy is imported.
    (cd "$venv" && "$venv/bin/python" - "$extra" "${MODULES[$extra]}" "$EXTRA_ONLY") <<'EOF'
import importlib
import pkgutil
import sys

extra, mine, extra_only = sys.argv[1], sys.argv[2].split(), set(sys.argv[3].split())
import gstream

if extra == "core":
    # Every module outside the extras, found by walking the package, so a
    # new module with a new dependency cannot slip through.
    mine = [m.name for m in pkgutil.walk_packages(gstream.__path__, "gstream.")
            if m.name not in extra_only]
failed = []
for name in mine:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        failed.append(f"{name}: {exc!r}")
        continue
    assert module.__file__ and "site-packages" in module.__file__, module.__file__
if extra == "gunicorn":
    # What `gunicorn -k ...` does with the worker class names (gunicorn's
    # own gevent worker imports packaging without declaring it).
    from gunicorn.util import load_class
    for worker in ("gstream.contrib.gunicorn.GeventWorker",
                   "gstream.contrib.gunicorn.GeventPyWSGIWorker", "gevent"):
        try:
            load_class(worker)
        except Exception as exc:  # gunicorn wraps the ImportError in a RuntimeError
            why = [line for line in str(exc).splitlines() if "Error" in line] or [repr(exc)]
            failed.append(f"gunicorn -k {worker}: {why[-1].strip()}")
if failed:
    print(f"gstream[{extra}] from the wheel alone cannot import:", *failed, sep="\n  ",
          file=sys.stderr)
    sys.exit(1)
print(f">> gstream[{extra}]: {len(mine)} modules import")
EOF
}

extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=(core redis locust flask django gunicorn)
for extra in "${extras[@]}"; do
    [ -n "${MODULES[$extra]+set}" ] || { echo "unknown extra: $extra" >&2; exit 2; }
    check "$extra"
done
