"""gstream.server.Server: connection cap, slowloris deadline, TLS, access log,
and graceful shutdown, against real clients on 127.0.0.1."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

import gevent
import pytest
import requests

from gstream.client import SSEClient
from gstream.server import Server
from tests.apps.basic import SLOW_IN_FLIGHT
from tests.apps.basic import app as basic_app
from tests.helpers import raw_http, read_response_head, wait_until
from tests.tlsutil import make_cert


@pytest.fixture
def start(gserver: Any) -> Any:
    def run(app: Any = basic_app, **kwargs: Any) -> Server:
        kwargs.setdefault("shutdown_timeout", 3.0)
        return gserver(app, **kwargs)

    return run


class Concurrency:
    """An app that holds each request ``hold`` seconds and records the peak concurrency."""

    def __init__(self, hold: float) -> None:
        self.hold, self.now, self.peak = hold, 0, 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            gevent.sleep(self.hold)
        finally:
            self.now -= 1
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]


def get(url: str, **kw: Any) -> requests.Response:
    return requests.get(url, timeout=10, **kw)


def test_serves_and_reports_url(start: Any) -> None:
    srv = start()
    assert srv.url == f"http://127.0.0.1:{srv.port}" and srv.port > 0
    r = get(srv.url + "/")
    assert r.status_code == 200 and r.text == "hello\n"


def test_cap_queue_mode_holds(start: Any) -> None:
    app = Concurrency(0.3)
    srv = start(app, max_connections=2)
    t0 = time.monotonic()
    jobs = [gevent.spawn(get, srv.url + "/") for _ in range(5)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert all(j.value.status_code == 200 for j in jobs)
    assert app.peak == 2  # never more than the cap at once...
    assert time.monotonic() - t0 >= 0.85  # ...so 5 requests took 3 rounds
    assert srv.rejected == 0


def test_cap_reject_mode_answers_503(start: Any) -> None:
    app = Concurrency(0.5)
    srv = start(app, max_connections=1, overflow="reject")
    held = gevent.spawn(get, srv.url + "/")
    assert wait_until(lambda: app.now == 1)
    r = get(srv.url + "/")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert "capacity" in r.text and srv.rejected == 1
    assert held.get(timeout=5).status_code == 200
    assert get(srv.url + "/").status_code == 200  # capacity again


def test_slowloris_head_deadline(start: Any) -> None:
    srv = start(header_timeout=0.3)
    slow = raw_http(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes the head
    t0 = time.monotonic()
    data = b""
    with gevent.Timeout(5):
        while chunk := slow.recv(4096):  # then closed by the server
            data += chunk
    assert 0.25 <= time.monotonic() - t0 < 2
    # An incomplete request gets 408 (RFC 9110 15.5.9) and Connection: close.
    assert data.startswith(b"HTTP/1.1 408 ") and b"Connection: close\r\n" in data
    # A normal request taking its time in the app is not affected.
    assert get(srv.url + "/slow?t=0.5").status_code == 200


def test_idle_keepalive_connection_is_closed_without_an_answer(start: Any) -> None:
    # header_timeout is also the keep-alive idle limit. Nothing of a next
    # request arrived, so there is nothing to answer 408 to (a 408 could cross
    # a request the client is sending): the connection is just closed.
    srv = start(header_timeout=0.3)
    conn = raw_http(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = read_response_head(conn)
    assert status == 200
    conn.settimeout(5)
    t0 = time.monotonic()
    rest = b""
    with gevent.Timeout(5):
        while chunk := conn.recv(4096):
            rest += chunk
    assert 0.25 <= time.monotonic() - t0 < 2
    assert b"HTTP/1.1" not in rest


def test_graceful_shutdown(start: Any) -> None:
    srv = start(shutdown_timeout=3.0)
    # Two open SSE streams, one in-flight slow request, one idle keep-alive connection.
    clients = [SSEClient(srv.url + "/stream", reconnect=False) for _ in range(2)]
    received: list[list[Any]] = [[], []]
    readers = [gevent.spawn(lambda c=c, out=out: out.extend(c)) for c, out in zip(clients, received, strict=True)]
    assert wait_until(lambda: all(received))
    idle = raw_http(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = read_response_head(idle)
    assert status == 200
    slow = gevent.spawn(get, srv.url + "/slow?t=0.6")
    assert wait_until(lambda: SLOW_IN_FLIGHT[0] == 1)  # in the app, not just connecting
    t0 = time.monotonic()
    stopper = gevent.spawn(srv.stop)
    # The idle keep-alive connection is closed at once.
    with gevent.Timeout(1):
        while idle.recv(100):  # the rest of the body, then EOF
            pass
    # New connections are refused.
    gevent.sleep(0.05)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1)
    gevent.joinall(readers, timeout=3, raise_error=True)
    for out, client in zip(received, clients, strict=True):
        assert [e.data for e in out][0] == "hello"
        assert out[-1].event == "shutdown" and out[-1].data == "server shutting down"
        assert client.retry_ms == 1500
    r = slow.get(timeout=3)
    assert r.status_code == 200 and r.text == "done\n"
    assert r.headers.get("Connection") == "close"
    assert stopper.get(timeout=3) is True
    assert time.monotonic() - t0 < 1.5


def test_shutdown_deadline_cuts_rogue_streams(start: Any) -> None:
    srv = start()
    client = SSEClient(srv.url + "/rogue", reconnect=False)
    got: list[Any] = []
    reader = gevent.spawn(lambda: got.extend(client))
    assert wait_until(lambda: got)
    t0 = time.monotonic()
    assert srv.stop(timeout=0.5) is False
    assert 0.4 <= time.monotonic() - t0 < 2.5
    reader.join(timeout=3)
    assert reader.dead and [e.data for e in got] == ["rogue"]
    assert srv.connections == 0


def test_tls(start: Any, tmp_path: Any) -> None:
    cert, key = make_cert(str(tmp_path))
    srv = start(certfile=cert, keyfile=key)
    assert srv.url.startswith("https://")
    r = get(srv.url + "/", verify=cert)
    assert r.status_code == 200 and r.text == "hello\n"
    with pytest.raises(ValueError):
        Server(basic_app, certfile=cert)


def test_access_log(start: Any, caplog: Any) -> None:
    srv = start(access_log=True)
    with caplog.at_level(logging.INFO, logger="gstream.access"):
        assert get(srv.url + "/?x=1").status_code == 200
        assert wait_until(lambda: any("GET /?x=1" in r.getMessage() for r in caplog.records))
    quiet = start()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gstream.access"):
        assert get(quiet.url + "/").status_code == 200
    assert not [r for r in caplog.records if r.name == "gstream.access"]


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        Server(basic_app, overflow="drop")
    with pytest.raises(ValueError):
        Server(basic_app, max_connections=0)
