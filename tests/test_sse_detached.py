"""SSE subscribers served without a greenlet under gstream's Server (gstream.detached).

Once the prelude is out the request greenlet ends; events, heartbeats, the
shutdown event and both slow-subscriber policies still reach the client, and
a client that closes (FIN) or resets (RST) frees its seat at once. Under plain
pywsgi the same broker keeps the iterator form (one greenlet per stream).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from gstream.broker import SSEBroker
from gstream.detached import detached_streams
from gstream.events import Event
from gstream.handler import GStreamHandler
from tests.helpers import SSEStream, read_response_head, wait_until
from tests.leakcheck import hub_greenlets


def test_idle_subscribers_hold_no_greenlet_and_still_get_events(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=0.3)
    srv = gserver(broker.subscribe)
    baseline = hub_greenlets()
    clients = [SSEStream(srv.port, "/") for _ in range(30)]
    assert all(c.status == 200 for c in clients)
    assert wait_until(lambda: broker.subscriber_count == 30 and detached_streams() == 30, 5)
    # The request greenlets have ended: 30 idle subscribers, no greenlet each.
    assert wait_until(lambda: hub_greenlets() <= baseline + 2, 3), (hub_greenlets(), baseline)
    assert srv.connections == 30  # each still holds its seat under the cap
    broker.publish(Event(data="one", id="1"))
    broker.publish(Event(data="two", id="2"))
    for c in clients:
        assert [(e.data, e.last_event_id) for e in c.events(2)] == [("one", "1"), ("two", "2")]
    # Heartbeats (comments, no event) come from the broker's timer.
    first = clients[0]
    with gevent.Timeout(5):
        while b": heartbeat" not in first.raw:
            chunk = first.reader.read_chunk()
            assert chunk is not None
            first.raw += chunk
    broker.publish("three")
    assert first.next_event().data == "three"
    assert hub_greenlets() <= baseline + 2
    for c in clients:
        c.close()
    assert wait_until(lambda: srv.connections == 0 and broker.subscriber_count == 0
                      and detached_streams() == 0, 5)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_departed_client_frees_its_seat_at_once(gserver: Any, reset: bool) -> None:
    broker = SSEBroker()  # the default 30 s heartbeat: no write finds the departure
    srv = gserver(broker.subscribe)
    clients = [SSEStream(srv.port, "/") for _ in range(20)]
    assert wait_until(lambda: detached_streams() == 20 and srv.connections == 20, 5)
    for c in clients:
        if reset:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    left = time.monotonic()
    assert wait_until(lambda: broker.subscriber_count == 0 and srv.connections == 0
                      and detached_streams() == 0, 1.0), (
        broker.subscriber_count, srv.connections, time.monotonic() - left)
    assert broker.stats()["delivered"] == 0


def test_shutdown_event_reaches_detached_subscribers(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe)
    clients = [SSEStream(srv.port, "/") for _ in range(10)]
    assert wait_until(lambda: detached_streams() == 10, 5)
    stopper = gevent.spawn(srv.stop, 5)
    for c in clients:
        events = c.read_until_end()  # ends with the chunked terminator
        assert [e.event for e in events] == ["gstream.shutdown"], events
        assert b"retry: 3000" in c.raw
    assert stopper.get(timeout=10) is True
    assert detached_streams() == 0 and broker.subscriber_count == 0


def test_replay_prelude_then_live_events(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe)
    for i in range(5):
        broker.publish(Event(data=f"e{i}", id=str(i)))
    c = SSEStream(srv.port, "/", headers={"Last-Event-ID": "2"})
    assert [e.data for e in c.events(2)] == ["e3", "e4"]
    assert wait_until(lambda: detached_streams() == 1, 5)
    broker.publish(Event(data="e5", id="5"))
    assert c.next_event().data == "e5"
    c.close()


def test_drop_oldest_while_the_client_does_not_read(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe)
    c = SSEStream(srv.port, "/?buffer=4", rcvbuf=4096)
    assert wait_until(lambda: detached_streams() == 1, 5)
    big = "x" * 16384
    sent = 0
    while broker.stats()["dropped"] == 0 and sent < 2000:  # until the socket buffers are full
        broker.publish(Event(data=big, id=str(sent)))
        sent += 1
        gevent.sleep(0)
    for _ in range(10):
        broker.publish(Event(data=big, id=str(sent)))
        sent += 1
    assert broker.stats()["dropped"] > 0
    got: list[Any] = []
    with gevent.Timeout(20):
        while not got or got[-1].last_event_id != str(sent - 1):
            got.append(c.next_event())
    missed = [e for e in got if e.event == "gstream.missed"]
    assert missed, [e.last_event_id for e in got]
    ids = [int(e.last_event_id) for e in got if e.event != "gstream.missed"]
    assert ids == sorted(ids) and ids[-4:] == list(range(sent - 4, sent))
    # Every event was either received or counted in a missed notice.
    assert len(ids) + sum(int(e.data.split(":")[1].rstrip("}")) for e in missed) == sent
    c.close()


def test_block_mode_waits_for_a_slow_reader_then_cuts_a_stuck_one(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None, allow_client_slow_mode=True, block_timeout=1.0)
    srv = gserver(broker.subscribe)
    slow = SSEStream(srv.port, "/?slow=block&buffer=2", rcvbuf=4096)
    stuck = SSEStream(srv.port, "/?slow=block&buffer=2", rcvbuf=4096)
    assert wait_until(lambda: detached_streams() == 2, 5)
    big = "y" * 65536
    got: list[Any] = []

    def read_all() -> None:
        while not got or got[-1].data != "end":
            got.append(slow.next_event(20))

    reader = gevent.spawn(read_all)
    sent = 0
    while broker.stats()["cut"] == 0 and sent < 400:  # until `stuck`'s buffers are full
        broker.publish(Event(data=big, id=str(sent)))  # waits for room in `slow`'s queue
        sent += 1
    broker.publish(Event(data="end", id="end"))
    reader.get(timeout=30)
    assert [e.last_event_id for e in got] == [str(i) for i in range(sent)] + ["end"]  # no loss
    assert broker.stats()["cut"] == 1 and broker.stats()["dropped"] == 0
    assert wait_until(lambda: broker.subscriber_count == 1 and detached_streams() == 1
                      and srv.connections == 1, 5)
    with gevent.Timeout(10):  # the stuck client's connection was closed
        while stuck.reader.read_chunk() is not None:
            pass
    slow.close()
    stuck.close()


def test_plain_pywsgi_keeps_the_iterator_form(serve: Any) -> None:
    broker = SSEBroker(heartbeat_interval=0.2)
    srv = serve(broker.subscribe, WSGIServer, handler_class=GStreamHandler)
    c = SSEStream(srv.port, "/")
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    assert detached_streams() == 0
    broker.publish("hello")
    assert c.next_event().data == "hello"
    c.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 5)


def test_http10_stream_is_not_chunked_and_ends_with_the_connection(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe)
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    status, headers, rest = read_response_head(sock)
    assert status == 200 and "transfer-encoding" not in headers
    assert wait_until(lambda: detached_streams() == 1, 5)
    broker.publish("hi")
    broker.close()  # the `done` event, then the server closes the connection
    buf = rest
    with gevent.Timeout(5):
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
    assert b"data: hi\n\n" in buf and b"data: [DONE]\n\n" in buf, buf
    assert not buf.endswith(b"0\r\n\r\n")
    sock.close()
    assert wait_until(lambda: detached_streams() == 0 and srv.connections == 0, 5)


def test_flask_response_is_detached_too(gserver: Any) -> None:
    """Werkzeug hands a direct-passthrough body to the server as is, so a Flask view's
    broker stream is detached like the bare WSGI one."""
    from flask import Flask

    from gstream.contrib.flask import flask_response

    broker = SSEBroker(heartbeat_interval=None)
    app = Flask(__name__)
    app.add_url_rule("/events", "events", lambda: flask_response(broker))
    srv = gserver(app)
    c = SSEStream(srv.port, "/events")
    assert wait_until(lambda: broker.subscriber_count == 1 and detached_streams() == 1, 5)
    broker.publish("hi")
    assert c.next_event().data == "hi"
    c.close()
    assert wait_until(lambda: broker.subscriber_count == 0 and detached_streams() == 0, 5)


def test_multi_topic_streams_are_detached_too(gserver: Any) -> None:
    # A topic stream (docs/topics.md) is a subscriber like any other: served
    # by callbacks once its prelude is out, its topics' events still arrive.
    broker = SSEBroker()
    srv = gserver(broker.subscribe)
    baseline = hub_greenlets()
    clients = [SSEStream(srv.port, "/?topic=a&topic=b") for _ in range(10)]
    assert all(c.status == 200 for c in clients)
    assert wait_until(lambda: broker.subscriber_count == 10 and detached_streams() == 10, 5)
    assert wait_until(lambda: hub_greenlets() <= baseline + 2, 3), (hub_greenlets(), baseline)
    broker.publish(Event(data="to a"), topic="a")
    broker.publish(Event(data="to b"), topic="b")
    broker.publish(Event(data="to c"), topic="c")  # nobody asked for c
    for c in clients:
        assert [(e.event, e.data) for e in c.events(2)] == [("a", "to a"), ("b", "to b")]
    for c in clients:
        c.close()
    assert wait_until(lambda: srv.connections == 0 and detached_streams() == 0, 5)
