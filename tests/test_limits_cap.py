"""gstream serve at its connection cap, with every kind of seat holder, in both
overflow modes, and out of file descriptors. Each server runs in a subprocess
(tests/apps/cap_app.py) so that the test can see it survive."""

from __future__ import annotations

import os
import re
import selectors
import shutil
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
        line = self.p.stdout.readline() if readable([self.p.stdout], 20) else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.p.kill()
            self.p.wait(5)
            raise AssertionError(f"no URL in {line!r}; stderr: {self.stderr()}")
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


def readable(socks: list[Any], seconds: float) -> list[Any]:
    """Those of ``socks`` with something to read (or closed) within ``seconds``."""
    with selectors.DefaultSelector() as sel:  # select() stops at descriptor 1023
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        return [key.fileobj for key, _ in sel.select(seconds)]  # type: ignore[misc]


def silent(socks: list[socket.socket], seconds: float) -> bool:
    """True if nothing arrives on any of ``socks`` for ``seconds`` (nor is one closed)."""
    return not readable(socks, seconds)


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
    # In queue mode a waiting client took the seat of a connection whose
    # request had finished (idle keep-alive), or of a waiting client served
    # before it (timing decides which); the others stay usable.
    still_open = [s for s in busy if not closed_by_server(s, 0.3)]
    if overflow == "queue":
        assert CAP - 3 <= len(still_open) < CAP
    else:
        assert len(still_open) == CAP
    for s in still_open:
        again(s)
    assert proc.alive()
    no_tracebacks(proc)


def open_many(port: int, path: str, n: int) -> list[socket.socket]:
    """``n`` connections, each with its request sent (none waits for its answer)."""
    return [connect(port, path) for _ in range(n)]


def answered(socks: list[socket.socket], timeout: float) -> set[int]:
    """Indexes of ``socks`` that received something within ``timeout`` seconds."""
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    index = {s.fileno(): i for i, s in enumerate(socks)}
    while len(got) < len(socks) and (left := deadline - time.monotonic()) > 0:
        ready = readable([s for i, s in enumerate(socks) if i not in got], min(left, 0.2))
        for s in ready:
            got.add(index[s.fileno()])
    return got


def test_cap_kept_within_a_low_open_files_limit(server: Any) -> None:
    # Hard limit 256: the server cannot raise it, so it lowers its cap (default
    # 10,000) to what the descriptors allow, says so once, and queues the rest.
    proc = server("--overflow", "queue", nofile=256)
    clients = open_many(proc.port, "/sse", 300)
    served = answered(clients, 10)
    cap = 256 - 64  # gstream.limits.FD_RESERVE
    assert len(served) == cap, len(served)
    assert proc.alive()
    err = proc.stderr()
    assert err.count("max_connections lowered from 10000 to 192") == 1, err[-2000:]
    # Clients leave: the waiting ones get their seats (at the next heartbeat).
    leaving = sorted(served)[:150]
    for i in leaving:
        clients[i].close()
    waiting = [s for i, s in enumerate(clients) if i not in served]
    assert len(answered(waiting, 10)) == len(waiting)
    poke_until_served(proc.port, "still-serving")
    for i, s in enumerate(clients):
        if i not in leaving:
            read_until(s, b"still-serving")
    assert proc.alive()
    no_tracebacks(proc)


def test_out_of_descriptors_pauses_accepts_then_resumes(server: Any) -> None:
    proc = server("--overflow", "queue", nofile=256)
    # The application takes 140 descriptors for 2 s: accepting runs out of
    # them below the cap (192).
    status, body = get(proc.port, "/hog?n=140&t=2")
    assert status == 200 and b"hogging 140" in body
    t0 = time.monotonic()
    clients = open_many(proc.port, "/sse", 150)
    first = answered(clients, 1.0)
    assert 20 < len(first) < 150, len(first)
    assert proc.alive()
    # Once the descriptors are back, every waiting client is served.
    assert len(answered(clients, 10)) == 150
    assert time.monotonic() - t0 >= 1.5
    err = proc.stderr()
    assert err.count("out of file descriptors") == 1, err[-2000:]
    assert err.count("descriptors available again") == 1, err[-2000:]
    for s in clients[:100]:
        s.close()
    poke_until_served(proc.port, "after-emfile")
    for s in clients[100:]:
        read_until(s, b"after-emfile")
    no_tracebacks(proc)


def test_open_files_limit_raised_as_far_as_the_cap_needs(server: Any) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} too low to raise")

    def low_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile(mode="w+") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "gstream", "serve", "tests.apps.cap_app:app", "--port", "0",
             "--max-connections", "1000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=log, text=True, preexec_fn=low_soft)
        try:
            assert p.stdout is not None
            assert readable([p.stdout], 20) and "serving" in p.stdout.readline()
            with open(f"/proc/{p.pid}/limits") as f:
                line = next(x for x in f if x.startswith("Max open files"))
            assert line.split()[3] == "1064", line  # 1000 + FD_RESERVE
            log.seek(0)
            text = log.read()
            assert "raised the open-files limit (RLIMIT_NOFILE) from 256 to 1064" in text, text
            assert "lowered" not in text
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def test_default_cap_of_10000_idle_sse_streams(server: Any) -> None:
    # The default cap, as a new user meets it: 10,000 idle subscribers fill
    # it, the next client waits, the process stays up, and the waiting client
    # gets the first seat that frees (a departed subscriber is noticed at its
    # next heartbeat, 2 s here).
    proc = server("--overflow", "queue")
    holders: list[socket.socket] = []
    try:
        fill_the_default_cap(proc, holders)
    finally:
        for s in holders:
            s.close()


def fill_the_default_cap(proc: ServerProc, holders: list[socket.socket]) -> None:
    t0 = time.monotonic()
    for _ in range(20):
        batch = open_many(proc.port, "/idle", 500)
        holders += batch
        for s in batch:
            read_until(s, b"200 OK", timeout=20)
    filled = time.monotonic() - t0
    late = waiter(proc.port)
    assert silent([late], 1.0)
    assert proc.alive(), proc.stderr()[-3000:]
    holders[0].close()
    holders[1].close()
    read_until(late, b"start", timeout=10)
    poke_until_served(proc.port, "ten-thousand", timeout=10)
    for s in holders[2:10002:500]:  # a sample of the earlier streams
        read_until(s, b"ten-thousand", timeout=10)
    # The 9,998 subscribers left are served by loop callbacks, each without
    # a greenlet (gstream.detached); the two that left were freed.
    status, answer = get(proc.port, "/detached")
    assert (status, answer.rsplit(b"\r\n\r\n", 1)[-1]) == (200, b"9998\n")
    assert proc.alive()
    no_tracebacks(proc)
    print(f"10,000 streams opened in {filled:.1f} s")


def listen_backlog(port: int) -> int:
    """The backlog of the listener on ``port`` (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return int(out.split()[2])


@pytest.mark.skipif(not os.path.exists("/proc/sys/net/core/somaxconn") or not shutil.which("ss"),
                    reason="Linux with iproute2's ss only")
def test_backlog_default_and_from_the_command_line(server: Any) -> None:
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    proc = server()
    assert listen_backlog(proc.port) == min(4096, somaxconn)  # gevent's own default: 128
    proc = server("--backlog", "77")
    assert listen_backlog(proc.port) == 77
