"""gstream's gunicorn workers keep keep-alive connections fair (real gunicorn subprocesses).

Client A pipelines 100 requests that each burn 2 ms of CPU; once A's first
answer is back, client B sends one request. gunicorn's own loops serve A's
next request without going back to the event loop when it has already
arrived, so B would wait for all 100 (~200 ms); gstream's workers let the
loop run between requests, so B is answered within a few of A's.
"""

from __future__ import annotations

import socket
from pathlib import Path

import gevent
import pytest

from tests import examples_support as ex

pytest.importorskip("gunicorn")

BURST = 100


def _responses(buf: bytes) -> list[int]:
    """Order numbers of the complete responses in ``buf``."""
    out = []
    for part in buf.split(b"HTTP/1.1 200 OK")[1:]:
        head, sep, body = part.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if sep and len(body) >= length:
            out.append(int(body[:length]))
    return out


def _read_until(sock: socket.socket, buf: bytes, count: int) -> bytes:
    while len(_responses(buf)) < count:
        data = sock.recv(65536)
        assert data, "connection closed early"
        buf += data
    return buf


@pytest.mark.parametrize("worker", ["GeventWorker", "GeventPyWSGIWorker"])
def test_pipelining_client_does_not_starve_another(tmp_path: Path, worker: str) -> None:
    srv = ex.ExampleServer("gunicorn", "tests.apps.fair_app:app", {}, tmp_path,
                           worker=f"gstream.contrib.gunicorn.{worker}")
    try:
        with gevent.Timeout(20):
            a = socket.create_connection(("127.0.0.1", srv.port))
            b = socket.create_connection(("127.0.0.1", srv.port))
            for s in (a, b):  # both connections now wait between keep-alive requests
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                _read_until(s, b"", 1)
            a.sendall(b"GET /?ms=2 HTTP/1.1\r\nHost: x\r\n\r\n" * BURST)
            got_a = _read_until(a, b"", 1)
            first_a = _responses(got_a)[0]
            b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            served_b = _responses(_read_until(b, b"", 1))[0]
            got_a = _read_until(a, got_a, BURST)
            a.close()
            b.close()
    finally:
        srv.stop()
    last_a = max(_responses(got_a))
    # Without the pass through the loop B comes after all of A's (last_a + 1).
    assert served_b - first_a <= BURST // 2, (first_a, served_b, last_a)
