"""gstream serve at its connection cap, with every kind of seat holder, in both
overflow modes, and out of file descriptors. Each server runs in a subprocess
(tests/apps/cap_app.py) so that the test can see it survive."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.wsraw import KEY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 6
KINDS = ("sse", "chunked", "ws", "wscb")


class ServerProc:
    """``gstream serve tests.apps.cap_app:app`` in a subprocess, stderr in a file."""

    def __init__(self, *args: str, nofile: int | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop)

        def limit() -> None:
            if nofile is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.p = subprocess.Popen(
            [sys.executable, "-m", "gstream", "serve", "tests.apps.cap_app:app", "--port", "0",
             *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True,
            preexec_fn=limit)
        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], 20)
        line = self.p.stdout.readline() if ready else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"no URL in {line!r}; stderr: {self.stderr()}"
        self.port = int(m.group(1))

    def alive(self) -> bool:
        return self.p.poll() is None

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()


@pytest.fixture
def server() -> Iterator[Callable[..., ServerProc]]:
    started: list[ServerProc] = []

    def run(*args: str, nofile: int | None = None) -> ServerProc:
        proc = ServerProc(*args, nofile=nofile)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.stop()


def connect(port: int, path: str, *, ws: bool = False, keepalive: bool = True) -> socket.socket:
    """Open a connection and send one request (a WebSocket upgrade with ``ws``)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if ws:
        head += ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n")
    elif not keepalive:
        head += "Connection: close\r\n"
    s.sendall((head + "\r\n").encode())
    return s


def read_until(s: socket.socket, needle: bytes, timeout: float = 5.0) -> bytes:
    """Read until ``needle`` arrives (AssertionError on EOF or timeout)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} within {timeout} s; got {buf[-200:]!r}"
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except TimeoutError:
            continue
        assert data, f"connection closed before {needle!r}; got {buf[-200:]!r}"
        buf += data
    return buf


def silent(socks: list[socket.socket], seconds: float) -> bool:
    """True if nothing arrives on any of ``socks`` for ``seconds`` (nor is one closed)."""
    ready, _, _ = select.select(socks, [], [], seconds)
    return not ready


def hold(port: int, kind: str) -> socket.socket:
    """A stream of ``kind`` holding a seat, checked to be open and served."""
    s = connect(port, f"/{kind}", ws=kind.startswith("ws"))
    first = {"sse": b"200 OK", "chunked": b"start", "ws": b"hello", "wscb": b"hello"}[kind]
    read_until(s, first)
    return s


def waiter(port: int) -> socket.socket:
    """A client past the cap asking for a stream (so once served it keeps its seat)."""
    return connect(port, "/chunked")


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    """One request on a new connection: (status, whole response)."""
    s = connect(port, path, keepalive=False)
    buf = b""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            buf += data
    finally:
        s.close()
    m = re.match(rb"HTTP/1\.1 (\d+)", buf)
    assert m, buf
    return int(m.group(1)), buf


def poke_until_served(port: int, message: str, timeout: float = 5.0) -> None:
    """Send ``message`` to every stream, retrying while the server answers 503."""
    deadline = time.monotonic() + timeout
    while True:
        status, _ = get(port, f"/poke?m={message}")
        if status == 200:
            return
        assert time.monotonic() < deadline, f"/poke answered {status} for {timeout} s"
        time.sleep(0.1)


def no_tracebacks(proc: ServerProc) -> None:
    err = proc.stderr()
    assert "Traceback" not in err and "LoopExit" not in err, err[-3000:]


@pytest.mark.parametrize("kind", KINDS)
def test_queue_mode_at_the_cap_waits_then_serves_in_arrival_order(
        server: Any, kind: str) -> None:
    proc = server("--max-connections", str(CAP), "--overflow", "queue")
    holders = [hold(proc.port, kind) for _ in range(CAP)]
    waiters = []
    for _ in range(3):
        waiters.append(waiter(proc.port))
        time.sleep(0.1)  # so that they arrive in this order
    # Past the cap they wait in the backlog; the server is still there.
    assert silent(waiters, 0.6)
    assert proc.alive(), proc.stderr()[-3000:]
    # Each seat that frees goes to the longest waiting client, and only to it.
    for i in range(3):
        holders[i].close()
        read_until(waiters[i], b"start", timeout=5)
        assert silent(waiters[i + 1:], 0.5), f"waiter {i + 1} served early"
    # Earlier streams were untouched: every remaining holder gets a message
    # sent once a seat is free again.
    waiters[0].close()
    poke_until_served(proc.port, "poke-after-cap")
    for s in holders[3:]:
        read_until(s, b"poke-after-cap")
    for s in waiters[1:]:
        read_until(s, b"poke-after-cap")
    assert proc.alive()
    no_tracebacks(proc)


@pytest.mark.parametrize("kind", KINDS)
def test_reject_mode_at_the_cap_answers_503_then_accepts_again(server: Any, kind: str) -> None:
    proc = server("--max-connections", str(CAP), "--overflow", "reject")
    holders = [hold(proc.port, kind) for _ in range(CAP)]
    for _ in range(3):
        status, response = get(proc.port)
        assert status == 503 and b"\r\nRetry-After: 1\r\n" in response
    assert proc.alive(), proc.stderr()[-3000:]
    holders[0].close()  # back under the cap (once the server notices)
    poke_until_served(proc.port, "poke-after-503")
    for s in holders[1:]:
        read_until(s, b"poke-after-503")
    assert proc.alive()
    no_tracebacks(proc)


def idle_keepalive(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that made one request each and stay open, oldest first."""
    conns = []
    for _ in range(count):
        s = connect(port, "/")
        read_until(s, b"ok\n")
        conns.append(s)
        time.sleep(0.02)
    return conns


def again(s: socket.socket) -> None:
    """Another request on a kept-alive connection: it must be answered."""
    s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    read_until(s, b"ok\n")


def closed_by_server(s: socket.socket, timeout: float = 3.0) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(100) == b""
    except (TimeoutError, ConnectionResetError):
        return False


@pytest.mark.parametrize("overflow", ["queue", "reject"])
def test_idle_keepalive_seats_go_to_newcomers_one_at_a_time(server: Any, overflow: str) -> None:
    proc = server("--max-connections", str(CAP), "--overflow", overflow)
    conns = idle_keepalive(proc.port, CAP)
    # At the cap with nobody waiting, no kept-alive connection is closed.
    time.sleep(0.3)
    for s in conns:
        again(s)
    # A newcomer takes the seat of the connection idle the longest; the
    # others stay open.
    newcomers = []
    for i in range(2):
        newcomers.append(connect(proc.port, "/"))
        read_until(newcomers[-1], b"ok\n")
        assert closed_by_server(conns[i])
    for s in conns[2:] + newcomers:
        again(s)
    assert proc.alive()
    no_tracebacks(proc)


@pytest.mark.parametrize("overflow", ["queue", "reject"])
def test_keepalive_requests_in_flight_hold_the_cap(server: Any, overflow: str) -> None:
    proc = server("--max-connections", str(CAP), "--overflow", overflow)
    busy = [connect(proc.port, "/slow?t=1.5") for _ in range(CAP)]
    time.sleep(0.3)
    if overflow == "reject":
        status, response = get(proc.port)
        assert status == 503 and b"\r\nRetry-After: 1\r\n" in response
    late = [connect(proc.port, "/", keepalive=False) for _ in range(3)]
    if overflow == "queue":
        assert silent(late, 0.5)
    for s in busy:
        read_until(s, b"slow\n")
    for s in late:  # served once the in-flight requests are done
        read_until(s, b"ok\n" if overflow == "queue" else b"HTTP/1.1 ", timeout=5)
    # In queue mode each waiting client took the seat of a connection whose
    # request had finished (idle keep-alive); the others stay usable.
    still_open = [s for s in busy if not closed_by_server(s, 0.3)]
    assert len(still_open) == (CAP - 3 if overflow == "queue" else CAP)
    for s in still_open:
        again(s)
    assert proc.alive()
    no_tracebacks(proc)
