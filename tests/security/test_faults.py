"""Faults: clients vanishing mid-write (EPIPE, ECONNRESET), an application
that raises, and the server's own SIGTERM with 5,000 open streams
(python-anchors section 3: zombie generators sse-starlette#39/#40, gunicorn
#2010/#677, CLOSE_WAIT pile-ups; shutdown hangs sse-starlette#8/#124)."""

from __future__ import annotations

import random
import socket
import struct
import time

import gevent
import gevent.event
import pytest
import requests
from gevent.pool import Pool

from gstream.broker import SHUTDOWN_EVENT, SSEBroker
from tests import wsraw
from tests.helpers import ChunkedReader, SSEStream, raw_http, read_response_head, wait_until
from tests.leakcheck import LeakCheck
from tests.security.apps import SecurityApp
from tests.security.conftest import raise_nofile

SEED = 20261128


def _vanish(port: int, path: str, nbytes: int, reset: bool) -> None:
    """Read ``nbytes`` of a stream, then leave: a FIN (the server's next
    writes meet EPIPE) or, with ``reset``, an RST (ECONNRESET)."""
    s = raw_http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    try:
        got = 0
        while got < nbytes:
            data = s.recv(min(65536, nbytes - got))
            if not data:
                break
            got += len(data)
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()


@pytest.mark.parametrize("path", ["/sse", "/chunked", "/gen", "/events"])
def test_disconnect_mid_write_at_random_points(gserver, errors, path):
    """80 clients leave at random points of a busy stream, half with a reset.
    Every stream ends (its writer sees Closed, its generator is closed, its
    broker seat is freed), no greenlet or fd is left, nothing unexpected is
    logged, and a normal request is served right after."""
    rng = random.Random(SEED + len(path))
    app = SecurityApp(SSEBroker(heartbeat_interval=0.2))
    srv = gserver(app, header_timeout=2.0)
    publisher = None
    if path == "/events":
        def publish() -> None:
            while True:
                app.broker.publish("p" * 300)
                gevent.sleep(0.001)
        publisher = gevent.spawn(publish)
    with LeakCheck(extra={"connections": lambda: srv.connections,
                          "subscribers": lambda: app.broker.subscriber_count}):
        pool = Pool(40)
        for _ in range(80):
            pool.spawn(_vanish, srv.port, path, rng.randrange(0, 40_000), rng.random() < 0.5)
        pool.join(timeout=20, raise_error=True)
        if publisher is not None:
            assert wait_until(lambda: app.broker.subscriber_count == 0, 5)
            publisher.kill()
        else:
            assert wait_until(lambda: app.ended_streams == app.open_streams == 80, 5), (
                app.open_streams, app.ended_streams)
        assert wait_until(lambda: srv.connections == 0, 5)
        r = requests.get(srv.url + "/", timeout=5, headers={"Connection": "close"})
        assert r.status_code == 200
    assert not errors.unexpected()


def test_application_errors_are_logged_and_isolated(gserver, errors):
    """A handler that raises gets a 500 (before the response) or a cut
    connection (mid-stream); the error is logged; streams of other clients
    carry on without a gap."""
    app = SecurityApp(SSEBroker(heartbeat_interval=0.5, first_id=1))
    srv = gserver(app)
    others = [SSEStream(srv.port, "/events") for _ in range(5)]
    seen: list[list[str]] = [[] for _ in others]

    def read(stream: SSEStream, out: list[str]) -> None:
        while True:
            ev = stream.next_event(timeout=30)
            out.append(ev.event if ev.event != "message" else ev.last_event_id)

    readers = [gevent.spawn(read, st, out) for st, out in zip(others, seen, strict=True)]
    publisher_stop = gevent.event.Event()

    def publish() -> None:
        while not publisher_stop.is_set():
            app.broker.publish("tick")
            gevent.sleep(0.005)

    pub = gevent.spawn(publish)
    with LeakCheck(extra={"connections": lambda: srv.connections}):
        for _ in range(10):
            r = requests.get(srv.url + "/boom", timeout=5, headers={"Connection": "close"})
            assert r.status_code == 500
        for _ in range(10):
            s = raw_http(srv.port, b"GET /boom-mid HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, rest = read_response_head(s)
            reader = ChunkedReader(s, rest)
            assert status == 200
            with gevent.Timeout(5):
                assert reader.read_chunk() == b"partial\n"
                assert reader.read_chunk() is None  # connection cut...
            assert not reader.done  # ...without a terminating chunk: visibly truncated
            s.close()
        assert wait_until(lambda: srv.connections == 5, 5)
    publisher_stop.set()
    pub.join(timeout=2)
    # Logged through logging (gstream.server), with the traceback and the path.
    booms = [r for r in errors.records if r.exc_info and r.exc_info[0] is RuntimeError]
    assert len(booms) == 20 and all("boom" in str(r.exc_info[1]) for r in booms)
    assert {r.name for r in booms} == {"gstream.server"}
    assert {r.getMessage().split()[4] for r in booms} == {"/boom", "/boom-mid"}
    assert errors.unexpected(allow=(RuntimeError,)) == []
    gevent.sleep(0.2)
    # The other streams saw every event, with consecutive ids, throughout.
    total = app.broker.stats()["published"]
    assert total > 5
    for st, out, g in zip(others, seen, readers, strict=True):
        assert [int(i) for i in out] == list(range(1, total + 1)), out[:5]
        g.kill()
        st.close()


def _shutdown_reader(port: int) -> tuple[bool, bool, int]:
    """Open a broker stream and read it to the end; report (got the final
    event, saw the terminating chunk, retry hint)."""
    s = SSEStream(port, "/events", timeout=30)
    assert s.status == 200
    events = s.read_until_end(timeout=60)
    ok = bool(events) and events[-1].event == SHUTDOWN_EVENT
    retry = s.parser.retry or 0
    s.close()
    return ok, s.reader.done, retry


def _ws_shutdown_reader(port: int) -> int | None:
    sock, status, _, rest = wsraw.handshake(port, "/ws", timeout=30)
    assert status == 101
    code, _ = wsraw.Reader(sock, rest).until_close(timeout=60)
    sock.close()
    return code


def test_sigterm_with_5000_open_streams_drains_cleanly(server_process):
    """SIGTERM with 5,000 open streams (3,750 SSE, 1,250 WebSocket): every SSE
    client gets the ``gstream.shutdown`` event with a retry hint and a clean
    end of the chunked body, every WebSocket gets close 1001, and the process
    exits 0 well within its deadline."""
    n, n_ws = 3750, 1250
    assert raise_nofile() >= n + n_ws + 200
    deadline = 10.0
    proc = server_process("--max-connections", "6000", "--shutdown-timeout", str(deadline),
                          "--log-level", "warning", env={"GS_HEARTBEAT": "30"})
    pool = Pool(n + n_ws)
    jobs = [pool.spawn(_shutdown_reader, proc.port) for _ in range(n)]
    ws_jobs = [pool.spawn(_ws_shutdown_reader, proc.port) for _ in range(n_ws)]
    t_open = time.monotonic()
    while time.monotonic() - t_open < 60:
        st = requests.get(proc.url + "/stats", timeout=10, headers={"Connection": "close"}).json()
        if st["broker"]["subscribers"] == n and st["websockets"] == n_ws:
            break
        gevent.sleep(0.1)
    assert st["broker"]["subscribers"] == n and st["websockets"] == n_ws
    assert st["lifecycle"] == n + n_ws
    t0 = proc.terminate()
    assert proc.wait(deadline + 5) == 0
    drain = time.monotonic() - t0
    pool.join(timeout=30, raise_error=True)
    results = [j.value for j in jobs]
    assert sum(ok for ok, _, _ in results) == n
    assert sum(done for _, done, _ in results) == n
    assert all(retry > 0 for _, _, retry in results)
    assert [j.value for j in ws_jobs] == [1001] * n_ws
    assert drain < deadline, drain
    err = proc.stderr()
    assert "Traceback" not in err and "still open at the deadline" not in err, err
    print(f"\n{n} SSE + {n_ws} WebSocket streams drained in {drain:.2f} s (deadline {deadline} s)")
