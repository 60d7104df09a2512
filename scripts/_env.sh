# Shared set-up for scripts/demo.sh and scripts/test.sh: creates or refreshes
# the local virtualenv (.venv) and installs Debian packages on demand.
# Safe to run any number of times; a stamp skips pip when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

apt_install() {
    # apt_install PKG... : install the Debian packages that are missing.
    local missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo ">> apt-get install ${missing[*]}"
    # Wait for another apt (a parallel job) instead of failing on its lock.
    $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    # ensure_venv EXTRAS : venv with gstream installed editable plus EXTRAS.
    local extras="$1"
    if [ ! -x "$PY" ]; then
        echo ">> creating virtualenv in $VENV"
        python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$VENV"; }
        "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    fi
    local stamp="$VENV/.stamp-$(echo "$extras" | tr ',' '-')"
    local want
    want="$(cat "$ROOT/setup.py" "$ROOT/scripts/_env.sh" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo ">> installing gstream[$extras] into $VENV"
        # pip warns about every local index folder this machine lacks; keep
        # the log readable without hiding real errors (the exit status counts).
        "$PY" -m pip install -q -e "$ROOT[$extras]" 2>&1 | { grep -v "^WARNING: Location" || true; }
        [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "pip install failed" >&2; exit 1; }
        echo "$want" > "$stamp"
    fi
}
