"""Detached SSE streams (gstream.detached) at the limits and with hostile clients.

A client that stops reading while a send is pending, a replay prelude larger than
the socket buffers, bytes sent on an event stream, shutdown and ``broker.close()``
with a pending remainder, a reset in the middle of a partial send, and the
queue-mode connection cap filled with detached streams. Every case checks that
the seat, the subscriber and the stream are given back and that no loop
callback raised (an error there is only printed by gevent).
"""

from __future__ import annotations

import gc
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from gstream.broker import SSEBroker
from gstream.detached import MAX_DISCARD, DetachedStream, detached_streams
from gstream.events import Event
from gstream.sseparse import EventStreamParser
from tests.helpers import ChunkedReader, SSEStream, read_response_head, wait_until

BIG = "x" * 16384


@pytest.fixture
def hub_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Errors raised in loop callbacks (gevent would only print them)."""
    hub = gevent.get_hub()
    seen: list[Any] = []
    original = hub.handle_error

    def record(context: Any, kind: Any, value: Any, tb: Any) -> None:
        seen.append((context, kind, value))
        original(context, kind, value, tb)

    monkeypatch.setattr(hub, "handle_error", record)
    yield seen


def _stall(broker: SSEBroker) -> int:
    """Publish until every stream's send is pending (its queue overflowed); return how many."""
    sent = 0

    def stalled() -> bool:
        return all(s["dropped"] > 0 for s in broker.subscribers())

    while not stalled() and sent < 4000:  # ~64 MB: past any socket buffer
        broker.publish(Event(data=BIG, id=str(sent)))
        sent += 1
        # A timed yield runs the broker's batched wake-up (a 0 s timer) before
        # the next publish: a queue overflows only while its send is pending.
        gevent.sleep(0.001)
    assert stalled(), "a stream never blocked"
    return sent


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _all_given_back(srv: Any, broker: SSEBroker) -> bool:
    return (detached_streams() == 0 and srv.connections == 0
            and broker.subscriber_count == 0 and len(srv.lifecycle) == 0)


def _read_to_eof(sock: socket.socket, timeout: float = 20) -> bytes:
    buf = b""
    with gevent.Timeout(timeout):
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            buf += data
    return buf


def test_reset_in_the_middle_of_a_partial_send(gserver: Any, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None, default_buffer=4)
    srv = gserver(broker.subscribe)
    c = SSEStream(srv.port, "/", rcvbuf=4096, timeout=10)
    assert wait_until(lambda: detached_streams() == 1, 5)
    _stall(broker)
    for i in range(100):  # the client still does not read
        broker.publish(Event(data=BIG, id=f"more{i}"))
        gevent.sleep(0.001)
    # What the server holds for it stays bounded: its queue, and one pending
    # remainder of at most one coalesced chunk (the queue, a missed notice).
    (info,) = broker.subscribers()
    assert info["depth"] <= 4 and info["dropped"] >= 100
    (stream,) = [o for o in gc.get_objects() if type(o) is DetachedStream and not o.closed]
    assert 0 < len(stream.pending) <= 5 * (len(BIG) + 256), len(stream.pending)
    del stream
    _reset(c.sock)
    assert wait_until(lambda: _all_given_back(srv, broker), 5), (
        detached_streams(), srv.connections, broker.subscriber_count)
    for i in range(5):  # publishing after the departure finds nobody and raises nothing
        broker.publish(Event(data=BIG, id=f"after{i}"))
    gevent.sleep(0)
    assert hub_errors == []


def test_block_mode_stuck_reader_is_cut_within_the_block_timeout(
        gserver: Any, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None, allow_client_slow_mode=True, block_timeout=0.5)
    srv = gserver(broker.subscribe)
    c = SSEStream(srv.port, "/?slow=block&buffer=2", rcvbuf=4096, timeout=10)
    assert wait_until(lambda: detached_streams() == 1, 5)
    longest = 0.0
    sent = 0
    while broker.stats()["cut"] == 0 and sent < 400:
        began = time.monotonic()
        broker.publish(Event(data=BIG, id=str(sent)))
        longest = max(longest, time.monotonic() - began)
        sent += 1
    assert broker.stats()["cut"] == 1
    # The publisher waited at most one block timeout (generous bound: shared cores).
    assert longest < 0.5 + 5.0, longest
    assert wait_until(lambda: _all_given_back(srv, broker), 5)
    # The client reads what its buffers hold, then the connection ends.
    raw = _read_to_eof(c.sock)
    assert b"gstream.cut" not in raw  # the final frame could not reach it: it was stuck
    c.close()
    assert hub_errors == []


def test_replay_prelude_larger_than_the_socket_buffers(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None, history_size=400, default_buffer=1024)
    srv = gserver(broker.subscribe)
    for i in range(200):  # ~3.2 MB of history
        broker.publish(Event(data=BIG, id=str(i)))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 0\r\n\r\n")
    status, _, rest = read_response_head(sock)
    assert status == 200
    # While the prelude's remainder waits for the client, live events queue up.
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    for i in range(200, 230):
        broker.publish(Event(data=BIG, id=str(i)))
    reader = ChunkedReader(sock, rest)
    parser = EventStreamParser()
    got: list[str] = []
    with gevent.Timeout(30):
        while not got or got[-1] != "239":
            if len(got) == 229 and detached_streams() == 1:
                for i in range(230, 240):
                    broker.publish(Event(data="live", id=str(i)))
            chunk = reader.read_chunk()
            assert chunk is not None
            got.extend(e.last_event_id for e in parser.feed(chunk) if e.event != "gstream.missed")
            if len(got) == 229:
                assert wait_until(lambda: detached_streams() == 1, 5)
    assert got == [str(i) for i in range(1, 240)]  # in order, no gap, no duplicate
    sock.close()
    assert wait_until(lambda: detached_streams() == 0 and srv.connections == 0, 5)


def test_bytes_after_the_request_are_dropped_then_too_many_close_the_stream(
        gserver: Any, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe)
    c = SSEStream(srv.port, "/")
    assert wait_until(lambda: detached_streams() == 1, 5)
    # A pipelined second request is read and dropped: no second response.
    c.sock.sendall(b"GET /other HTTP/1.1\r\nHost: t\r\n\r\n")
    broker.publish(Event(data="one", id="1"))
    first = c.next_event()
    assert (first.data, first.last_event_id) == ("one", "1")
    assert b"HTTP/1.1" not in c.raw
    assert detached_streams() == 1 and srv.connections == 1
    # Garbage past MAX_DISCARD closes the stream and frees its seat.
    junk = b"z" * 8192
    sent = 0
    with gevent.Timeout(10):
        try:
            while sent <= MAX_DISCARD + len(junk):
                c.sock.sendall(junk)
                sent += len(junk)
        except OSError:
            pass  # closed under us: also fine
    assert wait_until(lambda: _all_given_back(srv, broker), 5)
    c.close()
    assert hub_errors == []


def test_pipelined_request_read_with_the_get_keeps_the_greenlet_form(gserver: Any) -> None:
    # Bytes of a next request that arrive with the GET are buffered by the
    # reader: the stream is not detached (they would be lost), and still works.
    # (Nor is the departure watched: a heartbeat's write finds the departure.)
    broker = SSEBroker(heartbeat_interval=0.2)
    srv = gserver(broker.subscribe)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /again HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, rest = read_response_head(sock)
    assert status == 200
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    assert detached_streams() == 0
    broker.publish(Event(data="hi", id="1"))
    reader, parser = ChunkedReader(sock, rest), EventStreamParser()
    got: list[Any] = []
    with gevent.Timeout(10):
        while not got:
            chunk = reader.read_chunk()
            assert chunk is not None
            got.extend(parser.feed(chunk))
    assert got[0].data == "hi"
    sock.close()
    assert wait_until(lambda: broker.subscriber_count == 0 and srv.connections == 0, 5)


def test_stop_with_a_pending_remainder_ends_by_the_deadline(
        gserver: Any, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None, default_buffer=4)
    srv = gserver(broker.subscribe)
    stuck = SSEStream(srv.port, "/", rcvbuf=4096, timeout=10)
    fine = SSEStream(srv.port, "/", rcvbuf=65536, timeout=10)
    assert wait_until(lambda: detached_streams() == 2, 5)
    _stall(broker)
    began = time.monotonic()
    stopper = gevent.spawn(srv.stop, 1.0)
    # The reading client gets its shutdown event (after what was published).
    events = fine.read_until_end(20)
    assert events[-1].event == "gstream.shutdown", [e.event for e in events[-3:]]
    clean = stopper.get(timeout=20)
    assert time.monotonic() - began < 1.0 + 10.0
    # A stream closed at the deadline did not end in time: stop() says so.
    assert clean is False
    assert _all_given_back(srv, broker), (detached_streams(), srv.connections,
                                           broker.subscriber_count, len(srv.lifecycle))
    raw = _read_to_eof(stuck.sock)
    assert b"gstream.shutdown" not in raw  # aborted: its last bytes were pending
    stuck.close()
    fine.close()
    assert hub_errors == []


def test_stop_with_a_pending_remainder_the_client_drains_in_time(
        gserver: Any, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None, default_buffer=4)
    srv = gserver(broker.subscribe)
    slow = SSEStream(srv.port, "/", rcvbuf=4096, timeout=10)
    assert wait_until(lambda: detached_streams() == 1, 5)
    _stall(broker)
    stopper = gevent.spawn(srv.stop, 20.0)
    gevent.sleep(0)
    # The client reads again: the remainder, then the shutdown event, then the end.
    events = slow.read_until_end(20)
    assert events[-1].event == "gstream.shutdown"
    assert stopper.get(timeout=20) is True
    assert _all_given_back(srv, broker)
    slow.close()
    assert hub_errors == []


def test_broker_close_with_a_pending_remainder(gserver: Any, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None, default_buffer=4)
    srv = gserver(broker.subscribe)
    slow = SSEStream(srv.port, "/", rcvbuf=4096, timeout=10)
    stuck = SSEStream(srv.port, "/", rcvbuf=4096, timeout=10)
    assert wait_until(lambda: detached_streams() == 2, 5)
    _stall(broker)
    broker.close()
    assert broker.subscriber_count == 0  # unrouted at once; the streams end as they can
    events = slow.read_until_end(20)
    assert events[-1].data == "[DONE]"
    assert wait_until(lambda: detached_streams() == 1 and srv.connections == 1, 5), (
        detached_streams(), srv.connections, len(srv.lifecycle))
    # The one that never reads keeps its seat until it leaves (as a greenlet in a
    # blocked write would); its reset gives everything back.
    _reset(stuck.sock)
    assert wait_until(lambda: _all_given_back(srv, broker), 5)
    slow.close()
    assert hub_errors == []


@pytest.mark.parametrize("leave", ["fin", "rst"])
def test_queue_cap_full_of_detached_streams_serves_waiters_in_order(
        gserver: Any, leave: str, hub_errors: list[Any]) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe, max_connections=2, overflow="queue")
    first = [SSEStream(srv.port, "/?id=a"), SSEStream(srv.port, "/?id=b")]
    assert wait_until(lambda: detached_streams() == 2 and srv.connections == 2, 5)
    waiting = []
    for name in ("c", "d"):
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(f"GET /?id={name} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        waiting.append(sock)
    assert broker.subscriber_count == 2
    for n, (gone, sock) in enumerate(zip(first, waiting, strict=True)):
        if leave == "rst":
            _reset(gone.sock)
        else:
            gone.close()
        status, _, _ = read_response_head(sock)
        assert status == 200
        assert wait_until(lambda: detached_streams() == 2 and srv.connections == 2, 5)
        if n == 0:  # the second waiter still waits
            waiting[1].setblocking(False)
            with pytest.raises(BlockingIOError):
                waiting[1].recv(1)
            waiting[1].setblocking(True)
            waiting[1].settimeout(10)
    broker.publish(Event(data="hi", id="1"))
    for sock in waiting:
        sock.close()
    assert wait_until(lambda: _all_given_back(srv, broker), 5)
    assert hub_errors == []
