"""Injection and confusion: hostile values from publishers and clients
cannot forge SSE fields, evict another principal's stream, or cause a wrong
replay. Streams are parsed with gstream.sseparse, as a browser would."""

from __future__ import annotations

import json
from urllib.parse import quote

import gevent
import pytest

from gstream.broker import EVICTED_EVENT, RESET_EVENT, SSEBroker
from gstream.events import Event, EventType
from gstream.sse import SSEWriter
from tests.helpers import SSEStream, raw_http, read_response_head
from tests.leakcheck import LeakCheck

BREAKERS = ["\r", "\n", "\r\n", "\0", "\u2028", "\u2029", "\u0085", "\r\r", "\n\n"]
FORGERIES = ["\nevent: forged", "\r\ndata: forged\r\n\r\n", "\nid: forged", "\rretry: 1",
             "\n\nevent: forged\ndata: x\n\n", "\0\nid: forged"]


def _cut(value: str) -> str:
    """What the standard lets through of a single-line field: up to CR/LF/NUL."""
    for i, ch in enumerate(value):
        if ch in "\r\n\0":
            return value[:i]
    return value


def _data(value: str) -> str:
    return value.replace("\r", "").replace("\0", "")


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for b in BREAKERS:
        cases.append((f"id{b}x", f"name{b}x", f"data{b}x"))
    for f in FORGERIES:
        cases.append((f"7{f}", f"n{f}", f"d{f}"))
    return cases


def test_broker_fields_cannot_be_forged(serve):
    """Every hostile publish arrives as exactly one event, with the name and
    id cut at the first CR/LF/NUL, data split only at LF (CR and NUL
    removed), Unicode separators (U+2028, U+2029, U+0085) kept verbatim
    (they are not line breaks for EventSource), and no ``retry`` change."""
    broker = SSEBroker(first_id=1, heartbeat_interval=None)
    srv = serve(broker.subscribe)
    s = SSEStream(srv.port, "/")
    assert s.status == 200
    cases = _cases()
    for ident, name, data in cases:
        broker.publish(Event(data=data, name=name, id=ident))
    got = s.events(len(cases))
    for ev, (ident, name, data) in zip(got, cases, strict=True):
        assert ev.event == _cut(name)
        assert ev.data == _data(data)
        expected_id = _cut(ident)
        assert ev.last_event_id == expected_id and ev.id_field_seen
        assert "forged" not in ev.event and "forged" not in ev.last_event_id
    assert s.parser.retry == broker.config.retry  # only the broker's own hint
    # Nothing else arrived: the next event is the sentinel.
    broker.publish(Event(data="sentinel"))
    assert s.next_event().data == "sentinel"
    s.close()


@pytest.mark.parametrize("ident", ["\n", "\r\n", "\0", "\nid: 5"])
def test_id_empty_after_truncation_gets_a_broker_id(serve, ident):
    """An id that truncates to nothing must not write ``id:`` (which would
    reset the browser's Last-Event-ID); the broker assigns one instead."""
    broker = SSEBroker(first_id=100, heartbeat_interval=None)
    srv = serve(broker.subscribe)
    s = SSEStream(srv.port, "/")
    returned = broker.publish(Event(data="x", id=ident))
    ev = s.next_event()
    assert returned == "100" and ev.last_event_id == "100"
    assert b"\nid: \n" not in s.raw and b"\nid:\n" not in s.raw
    s.close()


def test_sse_writer_comments_and_names_cannot_start_events(serve):
    def app(environ, start_response):
        sse = SSEWriter(environ, start_response)
        for f in FORGERIES + BREAKERS:
            sse.write_comment(f"c{f}")
            sse.write_event(f"n{f}", f"d{f}")
            sse.set_id(f"i{f}")
            sse.write_data("after")
        sse.write_done()
        return sse.close()

    srv = serve(app)
    s = SSEStream(srv.port, "/")
    events = s.read_until_end()
    n = len(FORGERIES + BREAKERS)
    assert len(events) == 2 * n + 1
    for i, f in enumerate(FORGERIES + BREAKERS):
        named, plain = events[2 * i], events[2 * i + 1]
        assert (named.event, named.data) == (_cut(f"n{f}"), _data(f"d{f}"))
        assert (plain.event, plain.data, plain.last_event_id) == ("message", "after", _cut(f"i{f}"))
    assert events[-1].event == "done"
    assert s.parser.retry is None
    assert all("forged" not in c for c in s.parser.take_comments())


def test_error_and_done_types_ignore_hostile_names(serve):
    broker = SSEBroker(first_id=1, heartbeat_interval=None)
    srv = serve(broker.subscribe)
    s = SSEStream(srv.port, "/")
    broker.publish(Event(data="e", type=EventType.ERROR, name="x\nevent: forged"))
    broker.publish(Event(data="d", type=EventType.DONE, name="y\ndata: forged"))
    assert [(e.event, e.data) for e in s.events(2)] == [("error", "e"), ("done", "d")]
    s.close()


# -- subscriber_id -----------------------------------------------------------

def _principal(environ):
    return environ.get("HTTP_X_USER") or None


@pytest.mark.parametrize("attacker_sid", [
    "tab", "tab\r\nX: y", "tab\0evil", "tab\nid: 1", "t%61b",
])
@pytest.mark.parametrize("attacker_user", [None, "mallory"])
def test_subscriber_id_cannot_evict_another_principal(serve, attacker_sid, attacker_user):
    """Alice's stream ``tab`` survives any newcomer claiming the same id
    (directly, through truncation tricks, or anonymously): both coexist and
    Alice keeps receiving every event. The same principal does evict (the
    positive control, so this test can fail)."""
    broker = SSEBroker(principal=_principal, heartbeat_interval=None, first_id=1)
    srv = serve(broker.subscribe)
    alice = SSEStream(srv.port, "/?subscriber_id=tab", headers={"X-User": "alice"})
    headers = {"X-User": attacker_user} if attacker_user else {}
    path = "/?subscriber_id=" + quote(attacker_sid, safe="%")
    mallory = SSEStream(srv.port, path, headers=headers)
    assert alice.status == mallory.status == 200
    assert broker.subscriber_count == 2
    broker.publish("one")
    assert alice.next_event().data == "one" and mallory.next_event().data == "one"
    assert broker.stats()["evicted"] == 0
    # Positive control: Alice's second tab replaces the first.
    alice2 = SSEStream(srv.port, "/?subscriber_id=tab", headers={"X-User": "alice"})
    ev = alice.next_event()
    assert ev.event == EVICTED_EVENT and broker.stats()["evicted"] == 1
    broker.publish("two")
    assert alice2.next_event().data == "two" and mallory.next_event().data == "two"
    for s in (alice, alice2, mallory):
        s.close()


# -- Last-Event-ID -----------------------------------------------------------

HOSTILE_IDS = {
    "non-numeric": ("header", "abc"),
    "negative": ("header", "-3"),
    "zero-padded": ("header", "03"),
    "future": ("header", "999999999"),
    "huge-10k": ("header", "9" * 10_000),
    "space-padded": ("query", " 3"),
    "crlf-injection": ("query", "3\r\nevent: forged\r\n\r\ndata: forged"),
    "nul": ("query", "\x003"),
    "u2028": ("query", "3\u2028event: forged"),
    "latin1-bytes": ("raw", b"\xff\xfe3"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_IDS))
def test_hostile_last_event_id_gets_documented_reset(serve, case):
    """Never a crash, never a replay from a guessed position: an id the
    broker did not issue verbatim gets one ``gstream.reset`` event whose
    ``id:`` is the latest id (so the client resumes from there), then live
    events flow. ``crlf-injection`` and ``nul`` are cut at the control
    character: what remains (``3`` or nothing) is treated as that id.
    (Heartbeats are short so the closed streams' seats are reclaimed.)"""
    broker = SSEBroker(first_id=1, heartbeat_interval=0.2)
    srv = serve(broker.subscribe)
    for i in range(5):
        broker.publish(f"e{i + 1}")  # ids 1..5
    where, value = HOSTILE_IDS[case]
    with LeakCheck(extra={"subscribers": lambda: broker.subscriber_count}):
        if where == "raw":
            sock = raw_http(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + value + b"\r\n\r\n")
            status, _, _ = read_response_head(sock)
            assert status == 200
            sock.close()
            return
        if where == "header":
            s = SSEStream(srv.port, "/", headers={"Last-Event-ID": value})
        else:
            s = SSEStream(srv.port, "/?last_event_id=" + quote(value, safe=""))
        assert s.status == 200
        broker.publish("live")
        events = s.events(1 if case == "nul" else 2)
        s.close()
    if case == "crlf-injection":  # cut to "3": a real id, so a correct replay
        assert [e.data for e in events] == ["e4", "e5"]
        return
    if case == "nul":  # cut to "": a fresh subscriber
        assert [e.data for e in events] == ["live"]
        return
    reset, live = events
    assert reset.event == RESET_EVENT and reset.last_event_id == "5"
    info = json.loads(reset.data)
    assert info["reason"] == "unknown" and info["latest_id"] == "5"
    assert len(info["last_event_id"]) <= 256
    assert live.data == "live" and live.last_event_id == "6"
    assert broker.stats()["replayed"] == 0


def test_reset_moves_a_stuck_client_forward(serve):
    """After a reset, reconnecting with the id it carried resumes exactly."""
    broker = SSEBroker(first_id=1, heartbeat_interval=None)
    srv = serve(broker.subscribe)
    broker.publish("a")
    s = SSEStream(srv.port, "/", headers={"Last-Event-ID": "nope"})
    reset = s.next_event()
    s.close()
    broker.publish("b")
    gevent.sleep(0.05)
    s2 = SSEStream(srv.port, "/", headers={"Last-Event-ID": reset.last_event_id})
    assert s2.next_event().data == "b"
    s2.close()
