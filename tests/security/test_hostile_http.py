"""Hostile HTTP clients against gstream's server: slowloris, oversized
heads, connect floods past the cap, garbage and resets. Every hostile client
gets a bounded, specific answer, and a normal request is served right after
(python-anchors section 3, items 9 and 12)."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

import gevent
import pytest
import requests
from gevent.pool import Pool

from gstream.broker import SSEBroker
from tests.helpers import read_response_head, wait_until
from tests.leakcheck import LeakCheck
from tests.security.apps import SecurityApp


class Holding:
    """Holds each request ``hold`` seconds; records the peak concurrency."""

    def __init__(self, hold: float) -> None:
        self.hold, self.now, self.peak, self.served = hold, 0, 0, 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/hold":
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                gevent.sleep(self.hold)
            finally:
                self.now -= 1
        self.served += 1
        start_response("200 OK", [("Content-Length", "3")])
        return [b"ok\n"]


def quick_get(url: str, timeout: float = 3.0) -> requests.Response:
    t0 = time.monotonic()
    # Connection: close, so an idle keep-alive socket is not counted as a leak.
    r = requests.get(url, timeout=timeout, headers={"Connection": "close"})
    r.elapsed_total = time.monotonic() - t0  # type: ignore[attr-defined]
    return r


def raw_status(port: int, request: bytes, timeout: float = 5.0) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
        except OSError:
            pass  # the server may answer and close before reading everything
        status, _, _ = read_response_head(s)
        return status


def test_slowloris_one_byte_per_second_is_cut_at_the_head_deadline(gserver, errors):
    """30 clients trickle a request head one byte a second; each is closed at
    the 1 s head deadline (the deadline is total, not per byte), while a
    normal request is served at once. No greenlet or fd outlives them."""
    srv = gserver(Holding(0), header_timeout=1.0)
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 20 + b"\r\n\r\n"
    closed_after: list[float] = []
    sent_bytes: list[int] = []

    def trickle() -> None:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        t0 = time.monotonic()
        n = 0
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                n += 1
                # Wait a second for the next byte, noticing a close at once.
                s.settimeout(1.0)
                try:
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            closed_after.append(time.monotonic() - t0)
            sent_bytes.append(n)
            s.close()

    with LeakCheck(extra={"connections": lambda: srv.connections}):
        jobs = [gevent.spawn(trickle) for _ in range(30)]
        gevent.sleep(0.3)
        r = quick_get(srv.url + "/")
        assert r.status_code == 200 and r.elapsed_total < 0.5  # type: ignore[attr-defined]
        gevent.joinall(jobs, timeout=10, raise_error=True)
    assert len(closed_after) == 30
    assert all(0.9 <= t < 2.6 for t in closed_after), closed_after
    assert max(sent_bytes) <= 3 < len(head)
    assert not errors.unexpected()


def test_oversized_heads_get_431_without_tracebacks(gserver, errors, capfd):
    """A 100 KB Last-Event-ID, 200 header lines, or many long lines adding up
    past ``max_header_bytes`` are each refused with 431 (RFC 6585 5), logged
    as one line (no traceback printed per hostile request), and the server
    carries on."""
    srv = gserver(SecurityApp(), header_timeout=2.0)
    base = b"GET /events HTTP/1.1\r\nHost: x\r\n"
    assert raw_status(srv.port, base + b"Last-Event-ID: " + b"7" * 100_000 + b"\r\n\r\n") == 431
    many = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    assert raw_status(srv.port, base + many + b"\r\n") == 431
    long_lines = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 30_000) for i in range(4))
    assert raw_status(srv.port, base + long_lines + b"\r\n") == 431
    # Just under the bound is still a normal request.
    ok = base.replace(b"/events", b"/") + b"X-Big: " + b"y" * 30_000 + b"\r\n\r\n"
    assert raw_status(srv.port, ok) == 200
    assert quick_get(srv.url + "/").status_code == 200
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err, captured.err
    assert not errors.unexpected()


def test_connect_flood_past_the_cap_in_reject_mode(gserver, errors):
    """300 simultaneous clients against a cap of 20: each gets 200 or 503
    (with Retry-After) or, past the bounded number of concurrent refusals,
    a closed connection; never more than 20 are in the app; the server never
    crashes and answers a normal request right after."""
    app = Holding(0.5)
    srv = gserver(app, max_connections=20, overflow="reject", backlog=1024)
    statuses: list[int] = []

    def client() -> None:
        try:
            statuses.append(raw_status(srv.port, b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n", 10))
        except OSError:
            statuses.append(-1)  # closed or reset without an answer: allowed

    with LeakCheck(extra={"connections": lambda: srv.connections}):
        pool = Pool(300)
        for _ in range(300):
            pool.spawn(client)
        pool.join(timeout=20, raise_error=True)
        assert len(statuses) == 300
        assert app.peak <= 20
        assert set(statuses) <= {200, 503, 0, -1}
        assert statuses.count(200) >= 20 and statuses.count(503) >= 100
        assert srv.rejected >= statuses.count(503)
        r = quick_get(srv.url + "/")
        assert r.status_code == 200 and r.elapsed_total < 1  # type: ignore[attr-defined]
    assert not errors.unexpected()


def test_connect_flood_past_the_cap_in_queue_mode(gserver, errors):
    """200 clients against a cap of 10 in queue mode: all are served in
    turn (they wait in the listen backlog), never more than 10 at once."""
    app = Holding(0.2)
    srv = gserver(app, max_connections=10, backlog=1024)
    with LeakCheck(extra={"connections": lambda: srv.connections}):
        pool = Pool(200)
        jobs = [pool.spawn(raw_status, srv.port, b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 20)
                for _ in range(200)]
        pool.join(timeout=30, raise_error=True)
        assert [j.value for j in jobs] == [200] * 200
        assert app.peak == 10
        assert wait_until(lambda: srv.connections == 0, 3)
        assert quick_get(srv.url + "/").status_code == 200
    assert not errors.unexpected()


def _garbage_client(port: int, kind: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        if kind == 0:  # connect and leave at once
            pass
        elif kind == 1:  # binary garbage
            s.sendall(bytes(range(256)) * 4)
        elif kind == 2:  # half a request line, then a reset
            s.sendall(b"GET /eve")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 3:  # a bad Content-Length
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
            s.recv(100)
        elif kind == 4:  # a request line past the limit
            s.sendall(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
            s.recv(100)
        elif kind == 5:  # an SSE request then a reset before reading anything
            s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            gevent.sleep(0.01)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    finally:
        s.close()


@pytest.mark.parametrize("kind", range(6))
def test_garbage_and_resets_leave_the_server_healthy(gserver, errors, kind):
    """Clients that leave at once, send garbage, reset mid-line, send a bad
    Content-Length or an over-long request line, or reset an open SSE
    stream: the server frees every connection and broker seat and serves a
    normal request. A reset idle SSE stream is found by its next write, so
    the bound is the heartbeat interval (0.3 s here; see docs/security.md)."""
    app = SecurityApp(SSEBroker(heartbeat_interval=0.3))
    srv = gserver(app, header_timeout=1.0)
    with LeakCheck(extra={"connections": lambda: srv.connections,
                          "subscribers": lambda: app.broker.subscriber_count}):
        gevent.joinall([gevent.spawn(_garbage_client, srv.port, kind) for _ in range(50)],
                       timeout=10, raise_error=True)
        assert wait_until(lambda: srv.connections == 0, 3)
        assert quick_get(srv.url + "/").status_code == 200
    assert not errors.unexpected()
