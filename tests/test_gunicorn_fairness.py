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
from tests.helpers import read_responses, response_bodies

pytest.importorskip("gunicorn")

BURST = 100


def _order(buf: bytes) -> list[int]:
    """The serving order numbers in the complete responses of ``buf``."""
    return [int(body) for body in response_bodies(buf)]


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
                read_responses(s, 1)
            a.sendall(b"GET /?ms=2 HTTP/1.1\r\nHost: x\r\n\r\n" * BURST)
            got_a = read_responses(a, 1)
            first_a = _order(got_a)[0]
            b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            served_b = _order(read_responses(b, 1))[0]
            got_a = read_responses(a, BURST, got_a)
            a.close()
            b.close()
    finally:
        srv.stop()
    last_a = max(_order(got_a))
    # Without the pass through the loop B comes after all of A's (last_a + 1).
    assert served_b - first_a <= BURST // 2, (first_a, served_b, last_a)
