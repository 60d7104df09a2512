"""WebSockets over TLS (wss://) on gstream's server: the TLS layer must carry
every byte both ways, also under backpressure and for callback-served sessions."""

from __future__ import annotations

import os
from typing import Any

import gevent
from websockets.sync.client import connect as ws_connect

from gstream import websocket_app, websocket_callback_app
from gstream.hub import Hub
from tests.helpers import wait_until
from tests.tlsutil import client_context, make_cert


def _echo(ws: Any) -> None:
    for msg in ws:
        ws.send(msg)


def test_wss_echo_small_and_large_messages(gserver: Any, tmp_path: Any) -> None:
    cert, key = make_cert(str(tmp_path))
    srv = gserver(websocket_app(_echo), certfile=cert, keyfile=key)
    ctx = client_context(cert)
    with ws_connect(f"wss://127.0.0.1:{srv.port}/", ssl=ctx, max_size=None) as c:
        for i in range(50):
            c.send(f"m{i}")
            assert c.recv(timeout=5) == f"m{i}"
        big = os.urandom(300_000)  # several TLS records and kernel buffers each way
        for _ in range(3):
            c.send(big)
        for _ in range(3):
            assert c.recv(timeout=10) == big


def test_wss_burst_is_read_whole(gserver: Any, tmp_path: Any) -> None:
    # Many frames in one TLS read: decrypted bytes left in the TLS buffer
    # must be processed without waiting for the socket to become readable.
    cert, key = make_cert(str(tmp_path))
    srv = gserver(websocket_app(_echo), certfile=cert, keyfile=key)
    with ws_connect(f"wss://127.0.0.1:{srv.port}/", ssl=client_context(cert)) as c:
        msgs = [f"burst-{i}-" + "x" * 2000 for i in range(200)]
        for m in msgs:
            c.send(m)
        assert [c.recv(timeout=5) for _ in msgs] == msgs


def test_wss_callback_session(gserver: Any, tmp_path: Any) -> None:
    cert, key = make_cert(str(tmp_path))
    hub = Hub(name="tls")
    hub.start()
    srv = gserver(websocket_callback_app(hub.register, lambda ws, m: hub.broadcast(m)),
                  certfile=cert, keyfile=key)
    ctx = client_context(cert)
    with ws_connect(f"wss://127.0.0.1:{srv.port}/", ssl=ctx) as a, \
            ws_connect(f"wss://127.0.0.1:{srv.port}/", ssl=ctx) as b:
        assert wait_until(lambda: hub.count == 2, 5)
        gevent.sleep(0.1)
        a.send("over tls")
        assert b.recv(timeout=5) == "over tls"
        assert a.recv(timeout=5) == "over tls"
    hub.stop()


def test_wss_in_loop_echo_small_large_and_burst(gserver: Any, tmp_path: Any) -> None:
    # in_loop over TLS: the reply of a message read from the TLS buffer is
    # queued from the loop; large replies exceed the kernel buffer (writer path).
    cert, key = make_cert(str(tmp_path))
    srv = gserver(websocket_callback_app(lambda ws: None, lambda ws, m: ws.send(m), in_loop=True),
                  certfile=cert, keyfile=key)
    with ws_connect(f"wss://127.0.0.1:{srv.port}/", ssl=client_context(cert),
                    max_size=None) as c:
        for i in range(20):
            c.send(f"m{i}")
            assert c.recv(timeout=5) == f"m{i}"
        msgs = [f"burst-{i}-" + "x" * 2000 for i in range(100)]
        for m in msgs:
            c.send(m)
        assert [c.recv(timeout=5) for _ in msgs] == msgs
        big = os.urandom(300_000)
        for _ in range(3):
            c.send(big)
        for _ in range(3):
            assert c.recv(timeout=10) == big
