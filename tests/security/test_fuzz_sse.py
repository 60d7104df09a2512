"""Property-based tests (hypothesis) through a real broker and a real
socket: whatever publishers send, a browser-conformant parser sees exactly
the published events; whatever bytes a client sends as a request head, the
server answers with a valid HTTP status or closes, never raises and never
leaks a greenlet. Examples are bounded so the file runs in seconds."""

from __future__ import annotations

import socket

import gevent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gstream.broker import SSEBroker
from gstream.events import Event, EventType
from tests.helpers import SSEStream
from tests.leakcheck import LeakCheck
from tests.security.apps import SecurityApp

# Text biased towards what breaks event streams.
NASTY = st.sampled_from(["\r", "\n", "\r\n", "\0", "\u2028", "\u2029", "\u0085", ":", " ",
                         "data:", "id:", "event:", "retry:", "\ufeff", "\ud800", "é", "😀"])
TEXT = st.lists(st.one_of(NASTY, st.text(max_size=8)), max_size=12).map("".join)
EVENTS = st.lists(
    st.tuples(TEXT, TEXT, st.one_of(st.none(), TEXT),
              st.sampled_from([EventType.MESSAGE, EventType.CUSTOM, EventType.ERROR,
                               EventType.DONE])),
    min_size=1, max_size=5)

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _cut(value: str) -> str:
    for i, ch in enumerate(value):
        if ch in "\r\n\0":
            return value[:i]
    return value


def _clean(value: str) -> str:
    return value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> "?"


def expected(data: str, name: str, ident: str | None, etype: EventType, assigned: str):
    data = _clean(data).replace("\r", "").replace("\0", "")
    if etype is EventType.ERROR:
        event = "error"
    elif etype is EventType.DONE:
        event = "done"
    elif name or etype is EventType.CUSTOM:
        event = _cut(_clean(name)) or "message"
    else:
        event = "message"
    wire_id = _cut(_clean(ident)) if ident is not None and _cut(ident) else assigned
    return data, event, wire_id


def test_broker_round_trip_matches_a_browser_parser(serve):
    broker = SSEBroker(first_id=1, heartbeat_interval=None, default_buffer=64)
    srv = serve(broker.subscribe)
    stream = SSEStream(srv.port, "/")
    assert stream.status == 200

    @FUZZ
    @given(EVENTS)
    def check(events):
        want = []
        for data, name, ident, etype in events:
            assigned = broker.publish(Event(data=data, name=name, id=ident, type=etype))
            want.append(expected(data, name, ident, etype, assigned))
        got = stream.events(len(want), timeout=5)
        assert [(e.data, e.event, e.last_event_id) for e in got] == want
        assert stream.parser.retry == broker.config.retry
        assert not stream.pending  # nothing extra was dispatched

    check()
    stream.close()


HEAD_PARTS = st.sampled_from([
    b"GET", b"POST", b"HEAD", b" ", b"/", b"/events", b"/stats", b"?", b"&", b"=", b"HTTP/1.1",
    b"HTTP/1.0", b"HTTP/9.9", b"\r\n", b"\n", b"\r", b":", b"Host: x", b"Content-Length: ",
    b"Transfer-Encoding: chunked", b"Last-Event-ID: ", b"Connection: close", b"Upgrade: websocket",
    b"Connection: Upgrade", b"-1", b"99999999999999999999", b"\x00", b"\xff", b"%0d%0a",
    b"subscriber_id=", b"buffer=", b"0\r\n\r\n", b"\r\n\r\n",
])
HEADS = st.one_of(st.lists(HEAD_PARTS, max_size=30).map(b"".join), st.binary(max_size=300))


def test_random_request_heads_get_a_status_or_a_close(gserver, errors):
    app = SecurityApp(SSEBroker(heartbeat_interval=0.2))
    srv = gserver(app, header_timeout=0.5)

    @FUZZ
    @given(HEADS)
    def check(head):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        try:
            s.sendall(head)
            s.shutdown(socket.SHUT_WR)  # what was sent is all there is
            with gevent.Timeout(5):
                first = s.recv(12)
        except ConnectionResetError:
            first = b""
        finally:
            s.close()
        if first:
            assert first.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), first
            assert first[9:12].isdigit() and 200 <= int(first[9:12]) < 600

    with LeakCheck(extra={"connections": lambda: srv.connections,
                          "subscribers": lambda: app.broker.subscriber_count}):
        check()
    assert not errors.unexpected()
