"""Test helpers: running servers, streaming HTTP reads, leak checks."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from greenlet import getcurrent, greenlet

from gstream.sseparse import EventStreamParser, ParsedEvent


class RunningServer:
    """A started WSGI server and the URL it listens on."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.host, self.port = server.address[0], server.address[1]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 2) -> None:
        self.server.stop(timeout=timeout)


def raw_http(port: int, request: bytes, *, timeout: float = 5.0,
             rcvbuf: int | None = None) -> socket.socket:
    """Open a TCP connection to 127.0.0.1:port and send ``request`` as is.

    ``rcvbuf`` sets a small receive buffer before connecting, so the server's
    sends block early (a slow reader).
    """
    if rcvbuf is None:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    else:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def response_bodies(buf: bytes) -> list[bytes]:
    """Bodies of the complete ``Content-Length`` responses at the start of ``buf``."""
    bodies = []
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            return bodies
        assert head.startswith(b"HTTP/1.1 200 "), head[:40]
        fields = head.lower().split(b"\r\n")[1:]
        length = next(int(f.split(b":", 1)[1]) for f in fields if f.startswith(b"content-length:"))
        if len(rest) < length:
            return bodies
        bodies.append(rest[:length])
        buf = rest[length:]


def read_responses(sock: socket.socket, count: int, buf: bytes = b"") -> bytes:
    """Read from ``sock`` until ``buf`` holds ``count`` complete responses; return it."""
    while len(response_bodies(buf)) < count:
        data = sock.recv(65536)
        assert data, "connection closed early"
        buf += data
    return buf


def read_response_head(sock: socket.socket, limit: int = 65536) -> tuple[int, dict[str, str], bytes]:
    """Read an HTTP response head; return (status, headers, bytes after head)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        assert len(buf) < limit, "response head too large"
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


class ChunkedReader:
    """Decode an HTTP/1.1 chunked body from a socket, incrementally."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = initial
        self.done = False

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_chunk(self) -> bytes | None:
        """Return the next chunk's payload, or None at the end of the body."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        size_line, _, rest = self.buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            if not self._fill():
                return None
            size_line, _, rest = self.buf.partition(b"\r\n")
        if size == 0:
            self.done = True
            return None
        self.buf = rest[size + 2 :]
        return rest[:size]


class SSEStream:
    """Read a server-sent event stream over a raw socket, like a browser."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None,
                 timeout: float = 5.0, rcvbuf: int | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n"
        self.sock = raw_http(port, req.encode(), timeout=timeout, rcvbuf=rcvbuf)
        self.status, self.headers, rest = read_response_head(self.sock)
        self.reader = ChunkedReader(self.sock, rest)
        self.parser = EventStreamParser()
        self.pending: list[ParsedEvent] = []
        self.raw = b""

    def next_event(self, timeout: float = 5.0) -> ParsedEvent:
        """Return the next dispatched event; raise on timeout or end."""
        with gevent.Timeout(timeout):
            while not self.pending:
                chunk = self.reader.read_chunk()
                if chunk is None:
                    raise EOFError("stream ended")
                self.raw += chunk
                self.pending.extend(self.parser.feed(chunk))
        return self.pending.pop(0)

    def events(self, n: int, timeout: float = 5.0) -> list[ParsedEvent]:
        return [self.next_event(timeout) for _ in range(n)]

    def read_until_end(self, timeout: float = 5.0) -> list[ParsedEvent]:
        out: list[ParsedEvent] = []
        with gevent.Timeout(timeout):
            while True:
                chunk = self.reader.read_chunk()
                if chunk is None:
                    break
                self.raw += chunk
                out.extend(self.parser.feed(chunk))
        return self.pending + out

    def close(self) -> None:
        self.sock.close()


def live_greenlets() -> int:
    """Number of live greenlets in this process (for leak checks)."""
    gc.collect()
    # type() rather than isinstance(): lazy objects (Django settings) evaluate
    # themselves when asked for __class__.
    # Only this thread's: gevent's threadpool (name resolution) starts worker
    # threads lazily, as many as the moment's load asks for, each with its own
    # greenlets, and keeps them: a pool, not a leak.
    mine = _root(getcurrent())
    return sum(1 for o in gc.get_objects()
               if issubclass(type(o), greenlet) and not o.dead and _root(o) is mine)


def _root(g: Any) -> Any:
    """The main greenlet of the thread ``g`` runs in (the end of its parent chain)."""
    while g.parent is not None:
        g = g.parent
    return g


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` cooperatively until true or ``timeout``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return bool(predicate())
        gevent.sleep(interval)


def close_code_received(client: Any, timeout: float = 5.0) -> int | None:
    """Read from a ``websockets`` sync client until it is closed; the code the
    server sent (None without a close frame). Fails if a message comes first.

    ``.rcvd``, not ``.close_code``: websockets 13.1's client has no close_code.
    """
    from websockets.exceptions import ConnectionClosed

    try:
        message = client.recv(timeout=timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError(f"expected a close, got a message: {message!r}")


def iter_sse(resp: Any) -> Iterator[ParsedEvent]:
    """Parse events from a ``requests`` streaming response as they arrive."""
    parser = EventStreamParser()
    for chunk in resp.iter_content(chunk_size=None):
        yield from parser.feed(chunk)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextmanager
def reference_ws_server() -> Iterator[int]:
    """Run the ``websockets`` package's own asyncio server (tests/apps/ws_echo.py)
    in a subprocess, as a reference peer; yield its port on 127.0.0.1."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "tests.apps.ws_echo"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        with gevent.Timeout(10):
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


class RecordingSocket:
    """Wraps a real OS socket and keeps what each ``send`` was given (a test
    sees how many sends a flush made, and which bytes objects they passed)."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sent: list[Any] = []

    def send(self, data: Any) -> int:
        self.sent.append(data)
        return self.raw.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)
