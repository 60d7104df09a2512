"""Hostile WebSocket peers against gstream's server, many at once, while
well-behaved clients (WebSocket echo and an SSE subscriber) keep being
served: every hostile peer is closed with its RFC code within its configured
bound, healthy clients keep their latency, and nothing leaks. (Per-frame
close codes are covered by tests/test_websocket_hostile.py; this file is
about bounds under concurrency and isolation.)"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from typing import Any

import gevent
import pytest

from gstream.broker import SSEBroker
from gstream.client import connect
from gstream.lifecycle import lifecycle
from gstream.websocket import WSConfig, open_connections
from tests import wsraw
from tests.helpers import SSEStream, wait_until
from tests.leakcheck import LeakCheck
from tests.security.apps import SecurityApp

LIMIT = 64 * 1024
CFG = WSConfig(read_limit=LIMIT, read_idle_timeout=0.3, pong_timeout=0.3, write_timeout=0.5,
               close_timeout=0.3, compression=True, send_buffer=8)
HOSTILE = 10


class Healthy:
    """A WebSocket echo client and an SSE subscriber, checked continuously."""

    def __init__(self, srv: Any, app: SecurityApp) -> None:
        self.ws = connect(f"ws://127.0.0.1:{srv.port}/ws", open_timeout=5)
        self.sse = SSEStream(srv.port, "/events")
        self.rtts: list[float] = []
        self.sse_events = 0
        self.app = app
        self.jobs = [gevent.spawn(self._echo), gevent.spawn(self._read_sse),
                     gevent.spawn(self._publish)]

    def _echo(self) -> None:
        i = 0
        while True:
            i += 1
            t0 = time.monotonic()
            self.ws.send(f"healthy {i}")
            assert self.ws.recv(timeout=5) == f"healthy {i}"
            self.rtts.append(time.monotonic() - t0)
            gevent.sleep(0.02)

    def _read_sse(self) -> None:
        while True:
            ev = self.sse.next_event(timeout=5)
            assert ev.event == "message", ev  # never a gstream.missed
            self.sse_events += 1

    def _publish(self) -> None:
        while True:
            self.app.broker.publish("tick")
            gevent.sleep(0.02)

    def stop(self) -> None:
        for j in self.jobs:
            assert not j.dead or j.successful(), j.exception
        gevent.killall(self.jobs)
        self.ws.close()
        self.sse.close()


def _never_pongs(port: int) -> int | None:
    s, status, _, rest = wsraw.handshake(port, "/ws")
    assert status == 101
    code, _ = wsraw.Reader(s, rest).until_close(timeout=5)  # pings are ignored, never answered
    s.close()
    return code


def _never_reads(port: int) -> int | None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.close()
    sock, status, _, _ = wsraw.handshake(port, "/ws")
    assert status == 101
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    msg = wsraw.frame(0x2, b"r" * 32768)
    try:
        with gevent.Timeout(5):
            for _ in range(400):  # 12.5 MiB of echo the peer never reads
                sock.sendall(msg)
    except (OSError, gevent.Timeout):
        pass  # the server stopped reading, then closed
    sock.close()
    return None  # no close frame can reach a peer that does not read


def _send_then_close_code(port: int, path: str, payloads: Any, headers: dict | None = None,
                          ) -> int | None:
    sock, status, _, rest = wsraw.handshake(port, path, headers=headers)
    assert status == 101
    reader = wsraw.Reader(sock, rest)

    def send() -> None:
        try:
            for p in payloads:
                sock.sendall(p)
                gevent.sleep(0)  # a busy peer in this process must not starve the rest
        except OSError:
            pass

    sender = gevent.spawn(send)
    code, _ = reader.until_close(timeout=5)
    sender.kill()
    sock.close()
    return code


def _length_2_63(port: int) -> int | None:
    return _send_then_close_code(port, "/ws", [b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"mask"])


def _endless_continuation(port: int) -> int | None:
    def frames():
        yield wsraw.frame(0x1, b"a", fin=False)
        while True:  # until the server closes
            yield wsraw.frame(0x0, b"c" * 1024, fin=False)
    return _send_then_close_code(port, "/ws", frames())


def _bomb() -> bytes:
    comp = zlib.compressobj(wbits=-15)
    body = comp.compress(b"\0" * (32 << 20)) + comp.flush(zlib.Z_SYNC_FLUSH)
    return wsraw.frame(0x1, body[:-4], rsv=4)  # ~32 KiB inflating to 32 MiB


# Built once: compressing in the test process would starve the in-process server.
BOMB = _bomb()


def _compression_bomb(port: int) -> int | None:
    return _send_then_close_code(port, "/ws", [BOMB],
                                 headers={"Sec-WebSocket-Extensions": "permessage-deflate"})


def _handler_raises(port: int) -> int | None:
    return _send_then_close_code(port, "/ws-boom", [wsraw.text("x")])


# kind -> (peer, close code the peer sees, close code the server records, bound in seconds)
KINDS = {
    "never_pongs": (_never_pongs, 1011, 1011, CFG.read_idle_timeout + CFG.pong_timeout + 1.0),
    "never_reads": (_never_reads, None, 1006, 2 * CFG.write_timeout + 2.0),
    "length_2_63": (_length_2_63, 1009, 1009, 1.0),
    "endless_continuation": (_endless_continuation, 1009, 1009, 1.5),
    "compression_bomb": (_compression_bomb, 1009, 1009, 1.5),
    "handler_raises": (_handler_raises, 1011, 1011, 1.0),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_hostile_peers_closed_within_bound_others_unaffected(gserver, errors, kind):
    peer, client_code, server_code, bound = KINDS[kind]
    app = SecurityApp(SSEBroker(heartbeat_interval=0.3), ws_config=CFG)
    srv = gserver(app, header_timeout=2.0)
    healthy = Healthy(srv, app)
    assert wait_until(lambda: len(healthy.rtts) > 3 and healthy.sse_events > 3, 5)
    with LeakCheck(extra={"websockets": lambda: len(open_connections()),
                          "lifecycle": lambda: len(lifecycle),
                          "connections": lambda: srv.connections}):
        t0 = time.monotonic()
        jobs = [gevent.spawn(peer, srv.port) for _ in range(HOSTILE)]
        gevent.joinall(jobs, timeout=bound + 5, raise_error=True)
        assert wait_until(lambda: len(app.ws_closes) >= HOSTILE, bound + 2)
        elapsed = time.monotonic() - t0
        assert elapsed <= bound, f"{kind}: closed after {elapsed:.2f}s > {bound}s"
        assert [j.value for j in jobs] == [client_code] * HOSTILE
        assert app.ws_closes == [server_code] * HOSTILE
        assert len(open_connections()) == 1  # only the healthy echo client
        rtts = healthy.rtts[3:]
        assert rtts and max(rtts) < 0.5, max(rtts)
        healthy.stop()
    allowed = (RuntimeError,) if kind == "handler_raises" else ()
    assert errors.unexpected(allow=allowed) == []
    if kind == "handler_raises":
        logged = [r for r in errors.records if r.name == "gstream.websocket" and r.exc_info]
        assert len(logged) == HOSTILE


@pytest.mark.parametrize("origin, status", [
    ("https://evil.example", 403),
    ("http://evil.example", 403),
    ("null", 403),
    ("http://127.0.0.1.evil.example", 403),
    ("https://127.0.0.1:{port}", 403),  # same host and port, other scheme
    ("http://127.0.0.1:1", 403),  # same host, other port
    ("http://127.0.0.1:{port}", 101),  # same origin
    (None, 101),  # not a browser: nothing to hijack
])
def test_cross_site_websocket_hijacking_refused_by_default(gserver, errors, origin, status):
    """CSWSH: a page on another origin cannot open a WebSocket with the
    user's cookies, because the default policy is same-origin."""
    app = SecurityApp(ws_config=None)
    srv = gserver(app)
    headers = {"Cookie": "session=secret"}
    if origin is not None:
        headers["Origin"] = origin.format(port=srv.port)
    sock, got, _, _ = wsraw.handshake(srv.port, "/ws", headers=headers)
    sock.close()
    assert got == status
    assert wait_until(lambda: len(open_connections()) == 0, 3)
    assert not errors.unexpected()
