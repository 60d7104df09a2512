"""Clients that leave an idle stream free their seat within a second, without any write.

Half of the clients close (FIN), half reset (RST: SO_LINGER 0). Nothing is
published and the broker keeps its default 30 s heartbeat, so before the
departure watch the server only noticed at the next heartbeat (30-37 s).
Servers: gstream's ``Server``, ``GStreamHandler`` on plain
``gevent.pywsgi.WSGIServer``, and gstream's gunicorn workers (subprocesses).
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from gstream.handler import GStreamHandler
from tests import examples_support as ex
from tests.apps.departure_app import DepartureApp
from tests.helpers import wait_until

WITHIN = 1.0  # seconds a departed client may keep its seat


def _open(port: int, path: str, wrap: Callable[[socket.socket], Any] | None = None) -> Any:
    """Start a GET of ``path``; return the socket once the head and a first chunk are in."""
    sock: Any = socket.create_connection(("127.0.0.1", port), timeout=5)
    if wrap is not None:
        sock = wrap(sock)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf or buf.endswith(b"\r\n\r\n"):
        data = sock.recv(4096)
        assert data, f"closed before the first chunk of {path}: {buf!r}"
        buf += data
    assert buf.startswith(b"HTTP/1.1 200 "), buf[:80]
    return sock


def _leave(sock: Any, reset: bool) -> None:
    if reset:  # SO_LINGER on, 0 s: close() sends an RST
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_through_count(stream: Any) -> bytes:
    """Everything until the pipelined /count's JSON body has arrived (fails if cut)."""
    buf = b""
    while b"application/json" not in buf or not buf.endswith(b"}"):
        data = stream.recv(65536)
        assert data, f"stream cut: {buf!r}"
        buf += data
    return buf


def _leave_all(socks: list[Any]) -> float:
    """Half close, half reset; return when the last one left."""
    for i, sock in enumerate(socks):
        _leave(sock, reset=bool(i % 2))
    return time.monotonic()


class _InProcess:
    """The app served in this process; ``connections()`` counts the server's seats."""

    def __init__(self, port: int, connections: Callable[[], int]) -> None:
        self.port = port
        self.connections = connections


@pytest.fixture(params=["gstream-server", "pywsgi-gstreamhandler"])
def served(request: Any, gserver: Any) -> Iterator[Callable[..., _InProcess]]:
    stops: list[Callable[[], Any]] = []

    def run(app: Any, **kwargs: Any) -> _InProcess:
        if request.param == "gstream-server":
            srv = gserver(app, **kwargs)
            return _InProcess(srv.port, lambda: srv.connections)
        pool = Pool(1000)
        wsgi = WSGIServer(("127.0.0.1", 0), app, handler_class=GStreamHandler, spawn=pool,
                          log=None, **kwargs)
        wsgi.start()
        stops.append(lambda: wsgi.stop(timeout=1))
        return _InProcess(wsgi.server_port, lambda: len(pool))

    yield run
    for stop in stops:
        stop()


def test_hundred_departed_subscribers_leave_within_a_second(served: Any, caplog: Any) -> None:
    caplog.set_level(logging.DEBUG, logger="gstream")
    app = DepartureApp()
    assert app.broker.config.heartbeat_interval == 30.0  # the default
    srv = served(app)
    with gevent.Timeout(20):
        socks = [_open(srv.port, "/sse") for _ in range(100)]
        assert wait_until(lambda: app.broker.subscriber_count == 100)
        assert srv.connections() == 100
        left = _leave_all(socks)
        freed = wait_until(lambda: app.broker.subscriber_count == 0 and srv.connections() == 0,
                           timeout=WITHIN)
        took = time.monotonic() - left
    assert freed, (app.broker.subscriber_count, srv.connections(), took)
    assert app.broker.stats()["delivered"] == 0  # nothing was written to find out
    # One debug line per departure, no error, no traceback.
    gone = [r for r in caplog.records if r.name == "gstream.departure"]
    assert len(gone) == 100, [r.getMessage() for r in gone][:3]
    assert {r.levelno for r in gone} == {logging.DEBUG}
    assert sum("closed the connection" in r.getMessage() for r in gone) == 50
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


@pytest.mark.parametrize("path", ["/chunked", "/chunked-writer", "/writer"])
def test_departed_streams_are_finalised_within_a_second(served: Any, path: str) -> None:
    app = DepartureApp()
    srv = served(app)
    with gevent.Timeout(20):
        socks = [_open(srv.port, path) for _ in range(20)]
        assert wait_until(lambda: app.state["running"] == 20)
        _leave_all(socks)
        done = wait_until(lambda: app.state["finalized"] == 20 and srv.connections() == 0,
                          timeout=WITHIN)
    assert done, (app.counts(), srv.connections())


def test_pipelining_client_is_not_cut(served: Any) -> None:
    """A request pipelined behind a stream is served after it; a departure
    elsewhere is still noticed."""
    app = DepartureApp()
    srv = served(app)
    with gevent.Timeout(20):
        gone = _open(srv.port, "/sse")
        stream = _open(srv.port, "/finite?ms=700")
        # The next request arrives while the stream waits between its chunks.
        stream.sendall(b"GET /count HTTP/1.1\r\nHost: t\r\n\r\n")
        gevent.sleep(0.1)
        _leave(gone, reset=False)
        assert wait_until(lambda: app.broker.subscriber_count == 0, timeout=WITHIN)
        buf = _read_through_count(stream)
        stream.close()
    assert b"two\n" in buf and b"0\r\n\r\n" in buf, buf
    assert buf.count(b"HTTP/1.1 200 ") == 1  # the stream's head came before this read


def test_tls_departures_leave_within_a_second(gserver: Any, tmp_path: Path) -> None:
    """Over TLS: a client that sends close_notify then FIN, one that closes
    without it, one that resets."""
    import ssl

    from tests.tlsutil import client_context, make_cert

    cert, key = make_cert(str(tmp_path))
    ctx = client_context(cert)
    app = DepartureApp()
    srv = gserver(app, certfile=cert, keyfile=key)

    def wrap(sock: socket.socket) -> Any:
        return ctx.wrap_socket(sock, server_hostname="127.0.0.1")

    with gevent.Timeout(20):
        socks = [_open(srv.port, "/sse", wrap) for _ in range(6)]
        assert wait_until(lambda: app.broker.subscriber_count == 6)
        for i, sock in enumerate(socks):
            if i % 3 == 0:  # close_notify, then FIN
                sock.settimeout(0.05)
                try:
                    sock.unwrap()  # sends close_notify, then waits for the server's
                except (OSError, ssl.SSLError):
                    pass
                sock.close()
            else:
                _leave(sock, reset=i % 3 == 2)
        freed = wait_until(lambda: app.broker.subscriber_count == 0 and srv.connections == 0,
                           timeout=WITHIN)
    assert freed, (app.broker.subscriber_count, srv.connections)


def _counts(port: int) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /count HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        buf = b""
        while data := s.recv(65536):
            buf += data
    counts: dict[str, int] = json.loads(buf.partition(b"\r\n\r\n")[2])
    return counts


@pytest.mark.parametrize("worker", ["GeventWorker", "GeventPyWSGIWorker"])
def test_gunicorn_workers_free_departed_streams(tmp_path: Path, worker: str) -> None:
    pytest.importorskip("gunicorn")
    srv = ex.ExampleServer("gunicorn", "tests.apps.departure_app:app", {}, tmp_path,
                           worker=f"gstream.contrib.gunicorn.{worker}")
    try:
        with gevent.Timeout(30):
            base = _counts(srv.port)
            socks = [_open(srv.port, "/sse") for _ in range(100)]
            for path in ("/chunked", "/chunked-writer", "/writer"):
                socks += [_open(srv.port, path) for _ in range(4)]
            opened = _counts(srv.port)
            assert opened["subscribers"] == 100 and opened["running"] == 12, opened
            left = _leave_all(socks)
            deadline = left + WITHIN
            while True:
                now = _counts(srv.port)
                done = (now["subscribers"] == 0 and now["running"] == 0
                        and now["finalized"] == 12 and now["fds"] <= base["fds"])
                if done or time.monotonic() > deadline:
                    break
                gevent.sleep(0.02)
            assert done, (base, now, srv.logs())
            # A request pipelined behind a stream is still answered.
            stream = _open(srv.port, "/finite?ms=300")
            stream.sendall(b"GET /count HTTP/1.1\r\nHost: t\r\n\r\n")
            buf = _read_through_count(stream)
            stream.close()
            assert b"two\n" in buf, buf
    finally:
        code = srv.stop()
    logs = srv.log_path.read_text()
    assert code == 0, logs
    assert "Traceback" not in logs, logs
