"""gstream.client.websocket against the reference server of the ``websockets``
package (asyncio, in a subprocess), over real 127.0.0.1 sockets."""

from __future__ import annotations

import os
from collections.abc import Iterator

import gevent
import pytest

from gstream.client import WebSocketClient, connect
from gstream.errors import Closed, HandshakeError
from tests.helpers import reference_ws_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ws_url() -> Iterator[str]:
    with reference_ws_server() as port:
        yield f"ws://127.0.0.1:{port}"


def test_echo_text_and_binary(ws_url: str) -> None:
    with connect(ws_url + "/echo") as ws:
        assert isinstance(ws, WebSocketClient)
        assert ws.response_status == 101
        ws.send("héllo")
        assert ws.recv(timeout=5) == "héllo"
        ws.send(b"\x00\xffbin")
        assert ws.recv(timeout=5) == b"\x00\xffbin"
        assert ws.messages_sent == 2 and ws.messages_received == 2
        assert ws.bytes_sent > 10 and ws.bytes_received > 10
    assert ws.closed and ws.close_code == 1000


def test_many_messages_in_order_with_concurrent_senders(ws_url: str) -> None:
    with connect(ws_url + "/echo") as ws:
        def sender(tag: str) -> None:
            for i in range(100):
                ws.send(f"{tag}{i}")

        greenlets = [gevent.spawn(sender, t) for t in "ab"]
        got = [ws.recv(timeout=5) for _ in range(200)]
        gevent.joinall(greenlets, raise_error=True)
    for tag in "ab":
        assert [m for m in got if m[0] == tag] == [f"{tag}{i}" for i in range(100)]


def test_fragmented_messages_are_reassembled(ws_url: str) -> None:
    with connect(ws_url + "/fragments") as ws:
        assert ws.recv(timeout=5) == "frag-ment-ed"
        assert ws.recv(timeout=5) == b"\x00\x01\x02"


def test_large_message_and_max_size(ws_url: str) -> None:
    with connect(ws_url + "/big?n=3000000", max_size=4 << 20) as ws:
        assert ws.recv(timeout=10) == b"x" * 3_000_000
    ws = connect(ws_url + "/big?n=200000", max_size=100_000)
    with pytest.raises(Closed) as info:
        ws.recv(timeout=5)
    assert info.value.code in (1009, 1006)
    ws.close()
    assert ws.closed


def test_server_close_1001_ends_iteration(ws_url: str) -> None:
    ws = connect(ws_url + "/bye")
    with gevent.Timeout(5):
        assert list(ws) == ["hello"]
    assert ws.close_code == 1001 and ws.close_reason == "going away"
    with pytest.raises(Closed) as info:
        ws.send("late")
    assert info.value.code == 1001
    with pytest.raises(Closed):
        ws.recv(timeout=1)


def test_ping_returns_round_trip(ws_url: str) -> None:
    with connect(ws_url + "/echo") as ws:
        rtts = [ws.ping().get(timeout=5) for _ in range(3)]
        assert all(0 <= r < 5 for r in rtts)
        pending = ws.ping()
    # Answered before the close or failed by it; never left hanging.
    assert pending.ready()


def test_subprotocol_and_headers(ws_url: str) -> None:
    with connect(ws_url + "/subprotocol", subprotocols=["chat"], origin="http://example.test",
                 headers={"X-Test": "1"}) as ws:
        assert ws.subprotocol == "chat"
        assert ws.recv(timeout=5) == "chat"


def test_handshake_refused(ws_url: str) -> None:
    with pytest.raises(HandshakeError) as info:
        connect(ws_url + "/forbidden")
    assert info.value.status == 403


def test_connection_refused_and_open_timeout() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(OSError):
        connect(f"ws://127.0.0.1:{port}/")
    # A listener that never answers the handshake.
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    try:
        with pytest.raises(TimeoutError):
            connect(f"ws://127.0.0.1:{lst.getsockname()[1]}/", open_timeout=0.3)
    finally:
        lst.close()


def test_recv_timeout_and_backpressure(ws_url: str) -> None:
    with connect(ws_url + "/count-on-go", max_queue=8) as ws:
        ws.send("go")
        gevent.sleep(0.2)
        # The reader stopped at the queue bound instead of buffering all 200.
        assert ws.messages_received <= 9
        assert [ws.recv(timeout=5) for _ in range(200)] == [str(i) for i in range(200)]
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.1)


def test_close_from_another_greenlet_wakes_reader(ws_url: str) -> None:
    ws = connect(ws_url + "/echo")
    g = gevent.spawn(ws.recv)
    gevent.sleep(0.05)
    with gevent.Timeout(5):
        ws.close(1000, "done")
        with pytest.raises(Closed):
            g.get()
    assert ws.close_code == 1000
