"""Topic streams at their limits with the default configuration (in memory), over
real sockets: at, past and back under every cap; ambiguous and malformed input
(docs/topics.md, "Names and patterns", "One resume point: the cursor")."""

import socket
import struct

import requests

from gstream.broker import RESET_EVENT, SSEBroker
from gstream.topics import MAX_CURSOR, parse_cursor
from tests.helpers import SSEStream, wait_until


def start(serve, **cfg):
    cfg.setdefault("heartbeat_interval", 0.05)  # a vanished client is noticed at the next write
    broker = SSEBroker(**cfg)
    return broker, serve(broker.subscribe)


def query(topics):
    return "/?" + "&".join(f"topic={t}" for t in topics)


def rst(stream: SSEStream) -> None:
    """Vanish with a TCP reset (SO_LINGER 0), no FIN."""
    stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.sock.close()


def test_max_topics_at_past_and_back_under(serve):
    broker, srv = start(serve)
    assert broker.config.max_topics == 16
    at = SSEStream(srv.port, query(f"t{i}" for i in range(16)))
    assert at.status == 200
    r = requests.get(f"http://127.0.0.1:{srv.port}{query(f't{i}' for i in range(17))}", timeout=5)
    assert r.status_code == 400 and b"too many topics: at most 16" in r.content
    # Duplicates are collapsed before counting: 17 values naming 16 topics are served.
    dup = SSEStream(srv.port, query(["t0"] + [f"t{i}" for i in range(16)]))
    assert dup.status == 200
    again = SSEStream(srv.port, query(f"u{i}" for i in range(16)))
    assert again.status == 200
    assert wait_until(lambda: broker.stats()["topic_streams"] == 3, 5)
    broker.publish("x", topic="t15")
    assert at.next_event().data == "x" and dup.next_event().data == "x"
    for s in (at, dup, again):
        s.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 10)


def test_cursor_of_exactly_max_cursor_characters_is_read_one_more_is_refused(serve):
    broker, srv = start(serve, first_id=1)
    broker.publish("e1", topic="a")
    broker.publish("e2", topic="a")
    cursor = "1;a=1"
    i = 0
    while len(cursor) + len(f";z{i}=1") <= MAX_CURSOR:  # parts for topics not asked for
        cursor += f";z{i}=1"
        i += 1
    cursor += "1" * (MAX_CURSOR - len(cursor))  # the last position, a few digits longer
    assert len(cursor) == MAX_CURSOR
    s = SSEStream(srv.port, "/?topic=a", {"Last-Event-ID": cursor})
    assert s.status == 200
    ev = s.next_event()
    assert (ev.event, ev.data) == ("a", "e2")  # resumed exactly after a=1
    s.close()
    r = requests.get(f"http://127.0.0.1:{srv.port}/?topic=a", timeout=5,
                     headers={"Last-Event-ID": cursor + "9"})
    assert r.status_code == 400 and b"longer than 4096" in r.content
    assert wait_until(lambda: broker.subscriber_count == 0, 10)


def test_a_plus_in_a_topic_name_is_the_name_not_a_space(serve):
    # '+' is a valid topic character, and a topic name can never hold a space,
    # so an unescaped '+' in ?topic= (EventSource("/events?topic=c++")) is the name.
    broker, srv = start(serve)
    for q in ("/?topic=c++", "/?topic=c%2B%2B"):
        s = SSEStream(srv.port, q)
        assert s.status == 200, s.status
        assert wait_until(lambda: broker.topic_subscribers("c++") == 1, 5)
        broker.publish("hi", topic="c++")
        ev = s.next_event()
        assert (ev.event, ev.data) == ("c++", "hi")
        s.close()
        assert wait_until(lambda: broker.topic_subscribers("c++") == 0, 10)
    r = requests.get(f"http://127.0.0.1:{srv.port}/?topic=a%20b", timeout=5)
    assert r.status_code == 400 and b"bad topic name" in r.content


def test_max_patterns_at_past_and_back_under_released_by_fin_and_rst(serve):
    broker, srv = start(serve)
    limit = broker.config.max_patterns
    assert limit == 1000
    streams = []
    n = 0
    while n < limit:  # 16 distinct patterns a stream (63 streams)
        k = min(16, limit - n)
        s = SSEStream(srv.port, query(f"p{n + i}/*" for i in range(k)))
        assert s.status == 200
        streams.append(s)
        n += k
    assert wait_until(lambda: broker.topic_subscribers("p999/*") == 1, 10)
    # An existing pattern costs nothing more; a new one is refused, with the reason.
    shared = SSEStream(srv.port, "/?topic=p0/*&topic=x")
    assert shared.status == 200
    r = requests.get(f"http://127.0.0.1:{srv.port}/?topic=new/*", timeout=5)
    assert r.status_code == 503 and r.headers.get("Retry-After")
    assert b"too many distinct patterns" in r.content
    broker.publish("m", topic="p999/z")
    assert streams[-1].next_event().data == "m"
    # The stream holding p999/* vanishes by RST, another (p0..p15, p0 shared) by FIN.
    rst(streams.pop())
    streams.pop(0).close()
    assert wait_until(lambda: broker.topic_subscribers("p999/*") == 0, 10)
    assert wait_until(lambda: broker.topic_subscribers("p1/*") == 0, 10)
    assert broker.topic_subscribers("p0/*") == 1  # still held by `shared`
    # 1000 - 8 - 15 = 977 held: 23 places again, taken to exactly 1000.
    back = SSEStream(srv.port, query(f"new{i}/*" for i in range(16)))
    assert back.status == 200
    last = SSEStream(srv.port, query(f"last{i}/*" for i in range(7)))
    assert last.status == 200
    r = requests.get(f"http://127.0.0.1:{srv.port}/?topic=more/*", timeout=5, stream=True)
    assert r.status_code == 503
    r.close()
    for s in [*streams, shared, back, last]:
        s.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 20)


def test_topic_and_matching_pattern_deliver_once_and_resume_exactly(serve):
    broker, srv = start(serve, first_id=1)
    sels = ["a/b", "a/*"]
    s = SSEStream(srv.port, "/?topic=a/b&topic=a/*&topic=a/b")  # a/b twice: once
    assert s.status == 200
    assert wait_until(lambda: broker.topic_subscribers("a/*") == 1, 5)
    for topic, data in [("a/b", "1"), ("a/c", "2"), ("a/b", "3"), ("a/c", "4"), ("a/b", "5")]:
        broker.publish(data, topic=topic)
    got = s.events(5)
    assert [(e.event, e.data) for e in got] == [("a/b", "1"), ("a/c", "2"), ("a/b", "3"),
                                                ("a/c", "4"), ("a/b", "5")]
    s.close()
    for upto in range(5):  # resume after every event: exactly the rest, once each
        cursor = got[upto].last_event_id
        r = SSEStream(srv.port, "/?topic=a/b&topic=a/*", {"Last-Event-ID": cursor})
        rest = r.events(4 - upto) if upto < 4 else []
        assert [e.data for e in rest] == [str(i) for i in range(upto + 2, 6)]
        assert parse_cursor(rest[-1].last_event_id, sels) == parse_cursor(got[-1].last_event_id,
                                                                          sels) if rest else True
        broker.publish("live", topic="a/b")
        assert r.next_event().data == "live"  # nothing replayed twice before it
        r.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 10)


def test_cursor_naming_other_topics_or_from_another_broker(serve):
    broker, srv = start(serve)
    other = SSEBroker()  # another broker life: its positions are not ours
    other_pos = other.publish("x", topic="a")
    other.close()
    broker.publish("e1", topic="a")
    # Parts for topics the request does not ask for are ignored; b starts from its bound.
    s = SSEStream(srv.port, "/?topic=b", {"Last-Event-ID": "1;a=1;zz=5"})
    assert s.status == 200
    assert wait_until(lambda: broker.topic_subscribers("b") == 1, 5)
    broker.publish("b1", topic="b")
    assert s.next_event().data == "b1"
    s.close()
    s = SSEStream(srv.port, "/?topic=a", {"Last-Event-ID": f"1;a={other_pos}"})
    ev = s.next_event()
    assert ev.event == RESET_EVENT and '"reason":"unknown"' in ev.data
    broker.publish("e2", topic="a")
    assert s.next_event().data == "e2"
    s.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 10)
