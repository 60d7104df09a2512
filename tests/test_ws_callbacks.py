"""websocket_callback_app: sessions served by callbacks, detached from their
request greenlet under gstream's server (no greenlet while idle), parked on
it under plain pywsgi; the same behaviour either way."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Any

import gevent
import pytest
from websockets.sync.client import connect as ws_connect

from gstream import WSConfig, websocket_callback_app
from gstream.client import connect
from gstream.handler import GStreamHandler
from gstream.hub import Hub
from gstream.websocket import detached_sessions
from tests import wsraw
from tests.helpers import close_code_received, wait_until
from tests.leakcheck import LeakCheck, hub_greenlets


def _chat(hub: Hub, closed: list[Any]) -> Any:
    def on_open(ws: Any) -> None:
        hub.register(ws)
        ws.on_close(closed.append)

    def on_message(ws: Any, msg: Any) -> None:
        if msg == "boom":
            raise RuntimeError("application bug")
        if msg == "slow":
            gevent.sleep(0.05)  # callbacks may block; order must hold
        hub.broadcast(msg, exclude=ws)
        ws.send(f"ack:{msg}")

    return websocket_callback_app(on_open, on_message)


@pytest.fixture(params=["gstream", "pywsgi"])
def room(request: Any, gserver: Any, serve: Any) -> Any:
    hub = Hub(name="cb")
    hub.start()
    closed: list[Any] = []
    app = _chat(hub, closed)
    if request.param == "gstream":
        srv = gserver(app)
    else:
        srv = serve(app, handler_class=GStreamHandler)
    yield request.param, srv, hub, closed
    hub.stop()


def test_messages_and_broadcasts_flow_in_order(room: Any) -> None:
    kind, srv, hub, _ = room
    url = f"ws://127.0.0.1:{srv.port}/"
    a, b = connect(url), connect(url)
    assert wait_until(lambda: hub.count == 2, 5)
    if kind == "gstream":
        assert detached_sessions() == 2
    for i in range(20):
        a.send("slow" if i == 3 else f"m{i}")
    with gevent.Timeout(5):
        acks = [a.recv() for _ in range(20)]
        seen = [b.recv() for _ in range(20)]
    expected = ["slow" if i == 3 else f"m{i}" for i in range(20)]
    assert acks == [f"ack:{m}" for m in expected]
    assert seen == expected
    a.close()
    b.close()


def test_detached_sessions_hold_no_greenlet_and_count_as_connections(gserver: Any) -> None:
    hub = Hub(name="idle")
    hub.start()
    srv = gserver(websocket_callback_app(hub.register))
    baseline = hub_greenlets()
    # Raw-socket clients: they hold no greenlet of their own in this process.
    clients = []
    for _ in range(30):
        sock, status, _, rest = wsraw.handshake(srv.port)
        assert status == 101
        clients.append((sock, wsraw.Reader(sock, rest)))
    assert wait_until(lambda: hub.count == 30, 5)
    # The request greenlets have ended: 30 idle members, no greenlet each.
    assert wait_until(lambda: hub_greenlets() <= baseline + 2, 3), (
        hub_greenlets(), baseline)
    assert srv.connections == 30
    assert hub.broadcast("hello")
    for _, reader in clients:
        assert reader.next() == (0x1, b"hello", True)
    for sock, _ in clients:
        sock.close()
    assert wait_until(lambda: srv.connections == 0 and hub.count == 0 and not detached_sessions(), 5)
    hub.stop()


def test_on_message_error_closes_1011_and_others_carry_on(room: Any) -> None:
    _, srv, hub, closed = room
    url = f"ws://127.0.0.1:{srv.port}/"
    with ws_connect(url) as bad, ws_connect(url) as good:
        assert wait_until(lambda: hub.count == 2, 5)
        bad.send("boom")
        assert close_code_received(bad) == 1011
        good.send("still here")
        assert good.recv(timeout=5) == "ack:still here"
    assert wait_until(lambda: len(closed) == 2, 5)


def test_without_on_message_client_messages_are_discarded(gserver: Any) -> None:
    hub = Hub(name="ro")
    hub.start()
    srv = gserver(websocket_callback_app(hub.register, config=WSConfig(max_queue=2)))
    c = connect(f"ws://127.0.0.1:{srv.port}/")
    assert wait_until(lambda: hub.count == 1, 5)
    for i in range(50):  # far past max_queue: nothing piles up, nothing closes
        c.send(f"x{i}")
    assert hub.broadcast("after")
    with gevent.Timeout(5):
        assert c.recv() == "after"
    (ws,) = hub.members
    assert ws.open and ws._inbound == []
    c.close()
    hub.stop()


def test_server_stop_closes_detached_sessions_with_1001(gserver: Any) -> None:
    hub = Hub(name="stop")
    srv = gserver(websocket_callback_app(hub.register))
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_connect(f"ws://127.0.0.1:{srv.port}/"))
                   for _ in range(5)]
        assert wait_until(lambda: hub.count == 5 and detached_sessions() == 5, 5)
        started = time.monotonic()
        assert srv.stop(timeout=3)
        assert time.monotonic() - started < 3
        for c in clients:
            assert close_code_received(c, timeout=3) == 1001
    assert not detached_sessions()


def test_vanishing_clients_leak_nothing(gserver: Any) -> None:
    hub = Hub(name="leak")
    hub.start()
    srv = gserver(websocket_callback_app(hub.register, lambda ws, m: ws.send(m)))
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    head = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
            b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with LeakCheck(extra={"detached": lambda: detached_sessions(), "members": lambda: hub.count}):
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(head)
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
            if i % 2:  # half send a masked frame first, then all reset
                s.sendall(b"\x81\x82" + b"\0\0\0\0" + b"hi")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        assert wait_until(lambda: not detached_sessions() and hub.count == 0 and srv.connections == 0, 10)
    hub.stop()


def test_a_chatty_session_keeps_one_dispatcher_then_holds_none(
        gserver: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every message of a request/response client is a burst of its own: a
    # greenlet spawned per burst cost twice the CPU of the `for m in ws`
    # form. The dispatcher now lingers (callbacks.LINGER) for the next one.
    from gstream.websocket import callbacks

    dispatchers: list[Any] = []  # the greenlets themselves: an id() may be reused

    def on_message(ws: Any, msg: Any) -> None:
        dispatchers.append(gevent.getcurrent())
        ws.send(msg)

    srv = gserver(websocket_callback_app(lambda ws: None, on_message))
    c = connect(f"ws://127.0.0.1:{srv.port}/")
    assert wait_until(lambda: detached_sessions() == 1, 5)
    for i in range(50):  # one at a time: each waits for its echo
        c.send(f"m{i}")
        assert c.recv(timeout=5) == f"m{i}"
    assert len({id(g) for g in dispatchers}) == 1, len({id(g) for g in dispatchers})
    # Idle past the linger, the session holds no greenlet any more.
    first = dispatchers[-1]
    began = time.monotonic()
    assert not first.dead  # lingering
    assert wait_until(lambda: first.dead, callbacks.LINGER + 5)
    assert time.monotonic() - began >= callbacks.LINGER * 0.5
    # A new burst after the linger: a new dispatcher, lingering 60 s this time.
    monkeypatch.setattr(callbacks, "LINGER", 60.0)
    c.send("again")
    assert c.recv(timeout=5) == "again"
    second = dispatchers[-1]
    assert second is not first
    # Closing while the dispatcher lingers ends it at once, not after LINGER.
    c.close()
    assert wait_until(lambda: second.dead and detached_sessions() == 0, 10)
