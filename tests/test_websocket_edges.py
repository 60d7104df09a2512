"""WebSocket edges (issue 18): a Close between fragments, messages that came
before a bad frame, keepalive while inbound reading is paused, and the close
behaviours the seed promised. Real servers, raw-socket or websockets clients."""

from __future__ import annotations

import socket
import time
from typing import Any

import gevent
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import gstream
from gstream import Closed, WSConfig, websocket_app, websocket_callback_app
from tests import wsraw
from tests.helpers import wait_until


def echo(ws: gstream.WebSocket) -> None:
    for m in ws:
        ws.send(m)


def echo_message(ws: gstream.WebSocket, message: gstream.websocket.Message) -> None:
    ws.send(message)


ECHO_APPS = {
    "handler": lambda: websocket_app(echo, WSConfig(close_timeout=0.5)),
    "callbacks": lambda: websocket_callback_app(lambda ws: None, echo_message,
                                                config=WSConfig(close_timeout=0.5)),
}


# ------------------------------------------------------- Close between fragments
@pytest.mark.parametrize(("close", "answer"), [(1000, 1000), (4001, 4001), (None, 1000)])
def test_close_between_fragments_is_answered_like_any_close(
        serve: Any, close: int | None, answer: int) -> None:
    """RFC 6455 5.4: control frames may come between fragments (Autobahn 7.1.5).
    websockets alone answers 1002 "incomplete fragmented message"."""
    srv = serve(ECHO_APPS["handler"]())
    sock, status, _, rest = wsraw.handshake(srv.port)
    assert status == 101
    sock.sendall(wsraw.text("fragment 1", fin=False) + wsraw.close_frame(close)
                 + wsraw.frame(0x0, b"fragment 2"))
    r = wsraw.Reader(sock, rest)
    assert r.until_close(timeout=3)[0] == answer  # no echo of half a message either
    assert r.at_eof(timeout=3)
    sock.close()


# --------------------------------------- messages that came before a bad frame
BAD_AFTER_MESSAGE = {
    "rsv2 (Autobahn 3.2)": (wsraw.frame(0x1, b"bad", rsv=2), 1002),
    "opcode 5 (4.1.3)": (wsraw.frame(0x5, b"bad"), 1002),
    "opcode 0xB (4.2.3)": (wsraw.frame(0xB, b"bad"), 1002),
    "continuation of nothing (5.15)": (wsraw.frame(0x0, b"bad", fin=False), 1002),
    "invalid UTF-8": (wsraw.text(b"\xff\xfe"), 1007),
}


@pytest.mark.parametrize("bad", list(BAD_AFTER_MESSAGE))
@pytest.mark.parametrize("app", list(ECHO_APPS))
def test_messages_before_a_bad_frame_are_answered_before_the_close(
        serve: Any, app: str, bad: str) -> None:
    """A valid message, a bad frame and a ping in one read: the application
    gets (and echoes) the message, then the connection fails; the ping after
    the bad frame is not answered."""
    frame, code = BAD_AFTER_MESSAGE[bad]
    srv = serve(ECHO_APPS[app]())
    sock, _, _, rest = wsraw.handshake(srv.port)
    sock.sendall(wsraw.text("Hello") + wsraw.text("fragmented, ", fin=False)
                 + wsraw.frame(0x0, b"then whole") + frame + wsraw.frame(0x9, b"ping"))
    r = wsraw.Reader(sock, rest)
    frames = []
    while not frames or frames[-1][0] != 0x8:
        frames.append(r.next(timeout=3))
    if code == 1007:
        # websockets parsed (and answered) the ping before gstream refused the
        # text: only a frame websockets itself refuses stops it short.
        frames.remove((0xA, b"ping", True))
    assert frames[:2] == [(0x1, b"Hello", True), (0x1, b"fragmented, then whole", True)]
    op, payload, _ = frames[2]
    assert (op, int.from_bytes(payload[:2], "big")) == (0x8, code)
    assert len(frames) == 3
    assert r.at_eof(timeout=3)
    sock.close()


def test_a_bad_frame_alone_still_fails_at_once(serve: Any) -> None:
    """Nothing came before it: the Close leaves in the same loop turn as always."""
    srv = serve(ECHO_APPS["handler"]())
    sock, _, _, rest = wsraw.handshake(srv.port)
    t0 = time.monotonic()
    sock.sendall(wsraw.frame(0x5, b"bad"))
    assert wsraw.Reader(sock, rest).until_close(timeout=3)[0] == 1002
    assert time.monotonic() - t0 < 0.5
    sock.close()


# -------------------------------------------- keepalive while inbound is paused
def test_dead_peer_found_while_inbound_is_paused(serve: Any) -> None:
    """A handler that only sends; the peer sends 20 messages (more than
    max_queue, 16: reading pauses), then goes silent and never answers a
    ping. The keepalive must still find it dead: 1011 within a few pong
    timeouts (before: reads paused, so no ping was ever sent)."""
    conns: list[gstream.WebSocket] = []

    def sender(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        try:
            while True:
                ws.send("tick")
                gevent.sleep(0.2)
        except Closed:
            pass

    srv = serve(websocket_app(sender, WSConfig(read_idle_timeout=0.3, pong_timeout=0.3,
                                                close_timeout=0.3)))
    sock, _, _, _ = wsraw.handshake(srv.port)
    sock.sendall(b"".join(wsraw.text(f"m{i}") for i in range(20)))
    t0 = time.monotonic()
    assert wait_until(lambda: conns and conns[0].wait_closed(0), 4)
    assert time.monotonic() - t0 < 2.5
    assert (conns[0].close_code, conns[0].close_reason) == (1011, "keepalive ping timeout")
    sock.close()


def test_live_peer_answers_pings_while_inbound_is_paused(serve: Any) -> None:
    """The same paused connection with a peer that answers pings: the pong is
    found behind its unread messages, the connection stays open, and every
    message is still delivered, in order, once the application reads."""
    conns: list[gstream.WebSocket] = []

    def parked(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        ws.wait_closed(10)

    srv = serve(websocket_app(parked, WSConfig(read_idle_timeout=0.2, pong_timeout=0.3)))
    sock, _, _, rest = wsraw.handshake(srv.port)
    sock.sendall(b"".join(wsraw.text(f"m{i}") for i in range(20)))
    r = wsraw.Reader(sock, rest)
    pings = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5:
        op, payload, _ = r.next(timeout=1)  # type: ignore[misc]
        assert op == 0x9
        pings += 1
        sock.sendall(wsraw.text(f"m{19 + pings}") + wsraw.frame(0xA, payload))
    ws = conns[0]
    assert pings >= 3 and ws.open and ws.latency is not None
    assert [ws.receive(timeout=1) for _ in range(20 + pings)] == [
        f"m{i}" for i in range(20 + pings)]
    ws.close()
    sock.close()


# --------------------------------------------------- the seed's close behaviours
@pytest.mark.parametrize("extra", [0, 30])
def test_messages_then_close_give_the_messages_then_closed(serve: Any, extra: int) -> None:
    """first, second, Close(1000): first, second, then Closed(1000). With 30
    more messages in between the inbound queue (16) is full when the Close is
    read: nothing may be lost either."""
    got: list[Any] = []

    def handler(ws: gstream.WebSocket) -> None:
        gevent.sleep(0.2)  # all three frames have arrived meanwhile
        try:
            while True:
                got.append(ws.receive(timeout=2))
        except Closed as exc:
            got.append(("Closed", exc.code))

    srv = serve(websocket_app(handler))
    sock, _, _, rest = wsraw.handshake(srv.port)
    middle = [f"m{i}" for i in range(extra)]
    sock.sendall(wsraw.text("first") + b"".join(wsraw.text(m) for m in middle)
                 + wsraw.text("second") + wsraw.close_frame(1000))
    assert wsraw.Reader(sock, rest).until_close(timeout=3)[0] == 1000
    assert wait_until(lambda: len(got) == 3 + extra, 3)
    assert got == ["first", *middle, "second", ("Closed", 1000)]
    sock.close()


@pytest.mark.parametrize("peer_sends", [0, 20])
def test_close_returns_as_soon_as_the_peer_answers(serve: Any, peer_sends: int) -> None:
    """close_timeout 2 s, an application that never reads: close() returns
    within 500 ms once the peer answers, also when the peer's messages filled
    the inbound queue and paused reading (before: it waited the 2 s out)."""
    took: list[float] = []

    def handler(ws: gstream.WebSocket) -> None:
        gevent.sleep(0.3)  # the peer's messages have arrived
        t0 = time.monotonic()
        ws.close()
        took.append(time.monotonic() - t0)

    srv = serve(websocket_app(handler, WSConfig(close_timeout=2.0)))
    with connect(f"ws://127.0.0.1:{srv.port}/", open_timeout=2, close_timeout=2) as c:
        for i in range(peer_sends):
            c.send(f"m{i}")
        with pytest.raises(ConnectionClosed):
            c.recv(timeout=3)  # the sync client answers the Close itself
    assert wait_until(lambda: took, 3)
    assert took[0] < 0.5, took


def test_default_write_timeout_closes_a_peer_that_never_reads(serve: Any) -> None:
    """The default 10 s write timeout: a peer that never reads is closed
    after 10 s of no progress, within 12 s."""
    conns: list[gstream.WebSocket] = []
    stalled: list[float] = []

    def flood(ws: gstream.WebSocket) -> None:
        conns.append(ws)
        chunk = b"x" * 65536
        try:
            while True:
                if not ws.try_send(chunk):
                    if not stalled:
                        stalled.append(time.monotonic())
                    gevent.sleep(0.05)
        except Closed:
            pass

    assert WSConfig().write_timeout == 10.0
    srv = serve(websocket_app(flood))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: " + wsraw.KEY + "\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert wait_until(lambda: stalled, 5)
    assert wait_until(lambda: conns[0].wait_closed(0), 12.5)
    took = time.monotonic() - stalled[0]
    assert 9.0 <= took < 12.0, took
    assert conns[0].close_reason == "write timeout"
    sock.close()


def test_empty_close_is_echoed_as_an_empty_close(serve: Any) -> None:
    srv = serve(ECHO_APPS["handler"]())
    sock, _, _, rest = wsraw.handshake(srv.port)
    sock.sendall(wsraw.close_frame(None))
    data = rest
    with gevent.Timeout(3):
        while chunk := sock.recv(65536):
            data += chunk
    assert data == b"\x88\x00"  # the whole answer: an empty Close, then EOF
    sock.close()
