"""Go net/http reference: build bench/servers/go once, then exec it with the same flags.

The binary is cached under bench/servers/go/.build/, named by a hash of the
sources and the Go version, so an edit or a new toolchain rebuilds it. The
build is offline: gorilla/websocket comes from Debian's
golang-github-gorilla-websocket-dev (go.mod ``replace``), never a module proxy.
Without Go (or gorilla) the runner is told the server is unavailable.
``--build`` only builds (the runner calls it first, outside the 30 s start
timeout). exec keeps the pid, so the runner measures the Go process itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # bench/ for ``common``

from common import announce_unavailable, raise_nofile, server_args  # noqa: E402

GO_DIR = os.path.join(HERE, "go")
BUILD_DIR = os.path.join(GO_DIR, ".build")
GORILLA = "/usr/share/gocode/src/github.com/gorilla/websocket"
INSTALL = "apt-get install golang-go golang-github-gorilla-websocket-dev (see bench/setup.sh)"
BUILD_TIMEOUT = 600


def build() -> str:
    """Path of the built server, building it if the sources changed."""
    go = shutil.which("go")
    if go is None:
        announce_unavailable(f"Go toolchain not found: {INSTALL}")
    if not os.path.isdir(GORILLA):
        announce_unavailable(f"gorilla/websocket source not at {GORILLA}: {INSTALL}")
    env = dict(os.environ, GOPROXY="off", GOFLAGS="-mod=readonly", GOWORK="off",
               GOTOOLCHAIN="local", CGO_ENABLED="0")
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = os.path.join(BUILD_DIR, "gocache")
    try:
        version = subprocess.run([go, "version"], capture_output=True, text=True, env=env,
                                 timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        announce_unavailable(f"`go version` failed: {exc}")
    digest = hashlib.sha256(version.encode())
    for name in ("main.go", "go.mod"):
        with open(os.path.join(GO_DIR, name), "rb") as f:
            digest.update(f.read())
    exe = os.path.join(BUILD_DIR, f"gonethttp-{digest.hexdigest()[:12]}")
    if os.path.exists(exe):
        return exe
    os.makedirs(BUILD_DIR, exist_ok=True)
    tmp = f"{exe}.tmp{os.getpid()}"
    try:
        res = subprocess.run([go, "build", "-o", tmp, "."], cwd=GO_DIR, env=env,
                             capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        announce_unavailable(f"go build failed: {exc}")
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        announce_unavailable(f"go build failed: {last[:200]}")
    os.replace(tmp, exe)  # atomic: two runners building at once both end with a whole file
    return exe


def main() -> None:
    if sys.argv[1:] == ["--build"]:
        print(build(), flush=True)
        return
    server_args()  # the same flags as every server: reject bad ones here, in Python's words
    exe = build()
    raise_nofile()
    os.execv(exe, [exe, *sys.argv[1:]])


if __name__ == "__main__":
    main()
