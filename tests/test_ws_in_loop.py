"""websocket_callback_app(in_loop=True): on_message called from the read callback itself
when nothing is queued either way, the dispatcher greenlet otherwise; order kept, a
blocking handler refused with 1011 and a log line, replies ahead of a later protocol error."""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any

import gevent
import pytest
from websockets.sync.client import connect as ws_connect

from gstream import WSConfig, websocket_callback_app
from gstream.handler import GStreamHandler
from gstream.hub import Hub
from tests import wsraw
from tests.helpers import close_code_received, wait_until


def _recording_echo(where: list[bool]) -> Any:
    def on_message(ws: Any, msg: Any) -> None:
        where.append(gevent.getcurrent() is gevent.get_hub())
        ws.send(msg)

    return on_message


@pytest.fixture(params=["gstream", "pywsgi"])
def start(request: Any, gserver: Any, serve: Any) -> Any:
    def start(app: Any) -> Any:
        if request.param == "gstream":
            return gserver(app)
        return serve(app, handler_class=GStreamHandler)

    return start


def test_a_request_response_client_is_served_from_the_loop(start: Any) -> None:
    where: list[bool] = []
    srv = start(websocket_callback_app(lambda ws: None, _recording_echo(where), in_loop=True))
    with ws_connect(f"ws://127.0.0.1:{srv.port}/") as c:
        for i in range(30):  # one at a time: nothing is ever queued
            c.send(f"m{i}")
            assert c.recv(timeout=5) == f"m{i}"
    assert len(where) == 30 and all(where), where


def test_without_in_loop_on_message_never_runs_in_the_loop(start: Any) -> None:
    where: list[bool] = []
    srv = start(websocket_callback_app(lambda ws: None, _recording_echo(where)))
    with ws_connect(f"ws://127.0.0.1:{srv.port}/") as c:
        for i in range(5):
            c.send(f"m{i}")
            assert c.recv(timeout=5) == f"m{i}"
    assert where == [False] * 5


def test_a_burst_in_one_read_keeps_its_order(start: Any) -> None:
    # 300 frames in one write: replies queue up behind the first, so most
    # messages take the dispatcher's path; the order must hold across both.
    where: list[bool] = []
    srv = start(websocket_callback_app(lambda ws: None, _recording_echo(where), in_loop=True))
    s, status, _, rest = wsraw.handshake(srv.port)
    assert status == 101
    s.sendall(b"".join(wsraw.text(f"n{i}") for i in range(300)))
    r = wsraw.Reader(s, rest)
    got = []
    for _ in range(300):
        f = r.next()
        assert f is not None
        got.append(f[1].decode())
    assert got == [f"n{i}" for i in range(300)]
    assert where[0] is True and False in where  # both paths were taken
    s.close()


def test_a_peer_that_stops_reading_gets_backpressure_not_an_error(gserver: Any) -> None:
    # The replies pile up (the client reads nothing): messages then wait for
    # the dispatcher, whose sends block for room instead of failing in the
    # loop; once the client reads, every reply arrives, in order, no 1011.
    cfg = WSConfig(send_buffer=4, max_queue=4)
    big = "x" * 60_000
    srv = gserver(websocket_callback_app(lambda ws: None, lambda ws, m: ws.send(big + m),
                                         cfg, in_loop=True))
    s, status, _, rest = wsraw.handshake(srv.port)
    assert status == 101
    n = 60  # ~3.6 MB of replies: far past the socket buffers and send_buffer
    for i in range(n):
        s.sendall(wsraw.text(f"{i:03d}"))
    r = wsraw.Reader(s, rest)
    for i in range(n):
        f = r.next(timeout=10)
        assert f is not None and f[0] == 0x1, f
        assert f[1] == (big + f"{i:03d}").encode()
    s.sendall(wsraw.close_frame(1000))
    assert r.until_close() == (1000, b"")
    s.close()


def test_a_blocking_handler_is_refused_with_1011_and_a_log_line(
        start: Any, caplog: pytest.LogCaptureFixture) -> None:
    def on_message(ws: Any, msg: Any) -> None:
        if msg == "block":
            gevent.sleep(0.01)  # not allowed in the loop
        ws.send(msg)

    srv = start(websocket_callback_app(lambda ws: None, on_message, in_loop=True))
    url = f"ws://127.0.0.1:{srv.port}/"
    with caplog.at_level(logging.ERROR, logger="gstream.websocket"):
        with ws_connect(url) as bad, ws_connect(url) as good:
            bad.send("fine")
            assert bad.recv(timeout=5) == "fine"
            bad.send("block")
            assert close_code_received(bad) == 1011
            good.send("still here")
            assert good.recv(timeout=5) == "still here"
        assert wait_until(lambda: "must not block" in caplog.text, 5), caplog.text


def test_an_error_in_the_loop_closes_1011(start: Any, caplog: pytest.LogCaptureFixture) -> None:
    def on_message(ws: Any, msg: Any) -> None:
        raise ValueError("application bug")

    srv = start(websocket_callback_app(lambda ws: None, on_message, in_loop=True))
    with caplog.at_level(logging.ERROR, logger="gstream.websocket"):
        with ws_connect(f"ws://127.0.0.1:{srv.port}/") as c:
            c.send("x")
            assert close_code_received(c) == 1011
        assert wait_until(lambda: "application bug" in caplog.text, 5)


def test_replies_leave_before_the_close_of_a_later_bad_frame(start: Any) -> None:
    srv = start(websocket_callback_app(lambda ws: None, lambda ws, m: ws.send(m.upper()),
                                       in_loop=True))
    s, status, _, rest = wsraw.handshake(srv.port)
    assert status == 101
    # Two good messages, then a frame with a reserved opcode, in one write.
    s.sendall(wsraw.text("a") + wsraw.text("b") + wsraw.frame(0x3, b"?"))
    r = wsraw.Reader(s, rest)
    assert r.next() == (0x1, b"A", True)
    assert r.next() == (0x1, b"B", True)
    code, _ = r.until_close()
    assert code == 1002
    s.close()


def test_a_chat_room_broadcasts_from_the_loop(gserver: Any) -> None:
    hub = Hub(name="loopchat")
    hub.start()
    srv = gserver(websocket_callback_app(
        hub.register, lambda ws, m: hub.broadcast(m, exclude=ws), in_loop=True))
    url = f"ws://127.0.0.1:{srv.port}/"
    with ws_connect(url) as a, ws_connect(url) as b:
        assert wait_until(lambda: hub.count == 2, 5)
        for i in range(20):
            a.send(f"m{i}")
        assert [b.recv(timeout=5) for _ in range(20)] == [f"m{i}" for i in range(20)]
    hub.stop()


def test_a_close_from_the_loop_is_answered_cleanly(start: Any) -> None:
    def on_message(ws: Any, msg: Any) -> None:
        ws.send("bye")
        ws.close(4000, "done")  # in the loop: starts the handshake, never waits

    srv = start(websocket_callback_app(lambda ws: None, on_message, in_loop=True))
    s, status, _, rest = wsraw.handshake(srv.port)
    assert status == 101
    s.sendall(wsraw.text("x") + wsraw.text("y"))
    r = wsraw.Reader(s, rest)
    assert r.next() == (0x1, b"bye", True)
    f = r.next()
    assert f is not None and f[0] == 0x8 and struct.unpack("!H", f[1][:2])[0] == 4000
    s.sendall(wsraw.close_frame(4000))
    assert r.at_eof()
    s.close()


def test_vanishing_in_loop_clients_leak_nothing(gserver: Any) -> None:
    # Clients that send and reset at once, mid-reply: the in-loop path must
    # leave no session, seat or greenlet behind.
    from gstream.websocket import detached_sessions
    from tests.leakcheck import LeakCheck

    srv = gserver(websocket_callback_app(lambda ws: None, lambda ws, m: ws.send(m * 1000),
                                         in_loop=True))
    with LeakCheck(extra={"detached": lambda: detached_sessions()}):
        for i in range(100):
            s, status, _, _ = wsraw.handshake(srv.port)
            assert status == 101
            if i % 2:  # half send a burst first (replies still queued), then all reset
                s.sendall(b"".join(wsraw.text("hi") for _ in range(20)))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        assert wait_until(lambda: not detached_sessions() and srv.connections == 0, 10)
