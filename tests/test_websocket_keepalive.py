"""Keepalive, write timeout, inbound overflow policies and greenlet leaks."""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent
import pytest
from websockets.sync.client import connect

import gstream
from gstream import WSConfig, websocket_app
from tests import wsraw
from tests.helpers import live_greenlets, wait_until


def _parked_app(config: WSConfig) -> tuple[Any, list[gstream.WebSocket]]:
    """An app whose sessions only wait to be closed (never call receive()),
    and the list their connections are appended to."""
    conns: list[gstream.WebSocket] = []

    def handler(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        ws.wait_closed(5)

    return websocket_app(handler, config), conns


def _answer_pings(sock: socket.socket, rest: bytes, seconds: float) -> int:
    """Pong every ping (4-byte nonce) the server sends for ``seconds``; count them."""
    r = wsraw.Reader(sock, rest)
    pings = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        op, payload, _ = r.next(timeout=1)  # type: ignore[misc]
        assert op == 0x9 and len(payload) == 4  # a nonce, to measure latency
        pings += 1
        sock.sendall(wsraw.frame(0xA, payload))
    return pings



def test_idle_connection_gets_pinged_and_survives_with_pongs(serve: Any) -> None:
    app, conns = _parked_app(WSConfig(read_idle_timeout=0.1, pong_timeout=0.2))
    srv = serve(app)
    sock, _, _, rest = wsraw.handshake(srv.port)
    assert _answer_pings(sock, rest, 0.8) >= 3
    assert conns[0].open and conns[0].latency is not None
    conns[0].close()
    sock.close()


def test_peer_that_never_pongs_is_closed_after_pong_timeout(serve: Any) -> None:
    app, conns = _parked_app(WSConfig(read_idle_timeout=0.1, pong_timeout=0.15,
                                      close_timeout=0.2))
    srv = serve(app)
    sock, _, _, rest = wsraw.handshake(srv.port)
    r = wsraw.Reader(sock, rest)
    t0 = time.monotonic()
    assert r.next()[0] == 0x9  # type: ignore[index]
    # Unsolicited pongs with the wrong payload do not count as an answer.
    sock.sendall(wsraw.frame(0xA, b"nope"))
    code, reason = r.until_close()
    assert code == 1011 and b"ping timeout" in reason
    assert r.at_eof()
    assert time.monotonic() - t0 < 1.5
    assert wait_until(lambda: conns[0].wait_closed(0), 2)
    assert conns[0].close_code == 1011
    sock.close()


def test_negative_sentinel_disables_keepalive(serve: Any) -> None:
    srv = serve(websocket_app(lambda ws: ws.wait_closed(1), WSConfig(read_idle_timeout=None)))
    sock, _, _, rest = wsraw.handshake(srv.port)
    sock.settimeout(0.4)
    with pytest.raises(socket.timeout):
        sock.recv(10)  # no ping within 0.4 s
    sock.close()


def test_peer_that_stops_reading_is_closed_after_write_timeout(serve: Any) -> None:
    conns: list[gstream.WebSocket] = []

    def handler(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        chunk = b"x" * 65536
        try:
            while True:
                ws.send(chunk)
        except gstream.Closed:
            pass

    srv = serve(websocket_app(handler, WSConfig(write_timeout=0.3)))
    sock, _, _, _ = wsraw.handshake(srv.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert wait_until(lambda: conns and conns[0].wait_closed(0), 4)
    assert conns[0].close_code == 1006 and conns[0].close_reason == "write timeout"
    sock.close()


@pytest.mark.parametrize("policy", ["drop", "close", "pause"])
def test_app_that_never_receives(serve: Any, policy: str) -> None:
    conns: list[gstream.WebSocket] = []

    def handler(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        ws.wait_closed(3)

    cfg = WSConfig(max_queue=4, inbound_overflow=policy, close_timeout=0.3)
    srv = serve(websocket_app(handler, cfg))
    sock, _, _, rest = wsraw.handshake(srv.port)
    r = wsraw.Reader(sock, rest)
    sock.sendall(b"".join(wsraw.text(f"m{i}") for i in range(10)) + wsraw.frame(0x9, b"still?"))
    if policy == "drop":
        assert r.next() == (0xA, b"still?", True)  # control frames still answered
        assert conns[0].dropped_inbound == 6
        assert [conns[0].receive(timeout=1) for _ in range(4)] == ["m0", "m1", "m2", "m3"]
    elif policy == "close":
        assert r.until_close()[0] == 1008
    else:
        # Reading paused after 4 messages (all 10 came in one read, so the
        # ping is processed); the application catching up resumes reading.
        assert r.next() == (0xA, b"still?", True)
        sock.sendall(wsraw.frame(0x9, b"again"))
        with pytest.raises(gevent.Timeout):
            r.next(timeout=0.3)  # paused: nothing read, nothing answered
        assert [conns[0].receive(timeout=1) for _ in range(10)] == [f"m{i}" for i in range(10)]
        assert r.next() == (0xA, b"again", True)  # resumed
    sock.close()


def test_no_greenlet_leak(serve: Any) -> None:
    def handler(ws: gstream.WebSocket) -> None:
        for m in ws:
            ws.send(m)

    srv = serve(websocket_app(handler, WSConfig(read_idle_timeout=0.05, pong_timeout=0.05,
                                                close_timeout=0.2, write_timeout=0.3)))
    url = f"ws://127.0.0.1:{srv.port}/"
    with connect(url) as c:  # warm up whatever the client and server cache
        c.send("warm")
        c.recv(timeout=2)
    gevent.sleep(0.1)
    before = live_greenlets()
    for i in range(10):
        with connect(url) as c:
            c.send(f"m{i}")
            assert c.recv(timeout=2) == f"m{i}"
    # Peers that vanish, never pong, or stop reading.
    socks = []
    for _ in range(5):
        s, _, _, _ = wsraw.handshake(srv.port)
        socks.append(s)
    socks[0].close()
    socks[1].sendall(wsraw.text("half", fin=False))
    gevent.sleep(0.6)  # keepalive closes the silent ones
    for s in socks:
        s.close()
    assert wait_until(lambda: not gstream.websocket.open_connections(), 3)
    assert wait_until(lambda: live_greenlets() <= before, 3), (live_greenlets(), before)


def test_idle_connection_has_no_extra_greenlet(serve: Any) -> None:
    conns: list[gstream.WebSocket] = []

    def handler(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        for m in ws:
            ws.send(m)

    srv = serve(websocket_app(handler))
    base = live_greenlets()
    socks = [wsraw.handshake(srv.port)[0] for _ in range(10)]
    assert wait_until(lambda: len(conns) == 10, 2)
    # One greenlet per connection: the server's own handler greenlet.
    assert live_greenlets() - base <= 10
    for s in socks:
        s.close()


def test_pings_keep_the_idle_pace_when_the_pong_wait_is_longer(serve: Any) -> None:
    # read_idle_timeout is the heartbeat; pong_timeout only bounds the wait
    # for an answer. (The next ping used to wait for pong_timeout to run out:
    # one ping per 10 s instead of per 2 s with a 2 s heartbeat.)
    app, _ = _parked_app(WSConfig(read_idle_timeout=0.1, pong_timeout=5.0))
    srv = serve(app)
    sock, _, _, rest = wsraw.handshake(srv.port)
    pings = _answer_pings(sock, rest, 0.8)
    assert pings >= 5, pings  # one per ~0.1 s of silence
    sock.close()


def test_keepalive_sweep_is_shared_and_goes_away_with_its_last_connection(serve: Any) -> None:
    from gstream.websocket import keepalive as wskeepalive

    app, conns = _parked_app(WSConfig(read_idle_timeout=0.05, pong_timeout=0.5))
    srv = serve(app)
    socks = [wsraw.handshake(srv.port)[0] for _ in range(3)]
    assert wait_until(lambda: len(conns) == 3, 2)
    sweeps = wskeepalive._sweeps.get(gevent.get_hub(), {})
    # One timer for all three connections. (Not "the only sweep": a connection
    # of an earlier test with another config may still be closing.)
    assert sweeps[(0.05, 0.5)].members == set(conns)
    for ws in conns:
        ws.close()
    for s in socks:
        s.close()
    assert wait_until(lambda: all(ws.wait_closed(0) for ws in conns), 3)
    assert (0.05, 0.5) not in wskeepalive._sweeps.get(gevent.get_hub(), {})


def test_pong_lookalike_inside_a_message_is_message_data(serve: Any) -> None:
    """A 10-byte read that looks like our pong, but continues a frame the parser
    has half read, is message data (the pong fast path only takes whole reads
    at a frame boundary)."""
    def echo(ws: gstream.WebSocket) -> None:
        for m in ws:
            ws.send(m)

    srv = serve(websocket_app(echo, WSConfig(read_idle_timeout=0.3, pong_timeout=5)))
    sock, _, _, rest = wsraw.handshake(srv.port)
    r = wsraw.Reader(sock, rest)
    op, nonce, _ = r.next(timeout=5)  # type: ignore[misc]
    assert op == 0x9
    lookalike = wsraw.frame(0xA, nonce)  # a valid pong, sent as payload bytes below
    payload = b"ab" + lookalike
    head = bytes([0x82, 0x80 | len(payload)]) + b"\0\0\0\0"  # binary, mask key 0
    sock.sendall(head + payload[:2])
    time.sleep(0.2)  # the server reads the first part on its own
    sock.sendall(payload[2:])
    deadline = time.monotonic() + 5
    op, data = 0, b""
    while op != 0x2 and time.monotonic() < deadline:
        # The echo comes back (pings may come first: the lookalike was not a pong).
        op, data, _ = r.next(timeout=5)  # type: ignore[misc]
        if op == 0x9:
            sock.sendall(wsraw.frame(0xA, data))
    assert (op, data) == (0x2, payload)
    sock.close()
