"""Many topics on one SSE stream (in memory): names, patterns, the cursor, delivery,
exact resume, authorization and hostile input, over real sockets (docs/topics.md)."""

import json

import gevent
import pytest
import requests

from gstream import Event
from gstream.broker import DENIED_EVENT, RESET_EVENT, SSEBroker
from gstream.client import SSEClient
from gstream.errors import TopicError
from gstream.topics import MAX_CURSOR, Pattern, encode_cursor, parse_cursor, parse_selectors
from gstream.topicstate import TopicRegistry
from tests.helpers import SSEStream, wait_until


def start(serve, **cfg):
    cfg.setdefault("heartbeat_interval", 0.05)  # a closed client is noticed at the next write
    broker = SSEBroker(**cfg)
    return broker, serve(broker.subscribe)


def data_of(events):
    return [(e.event, e.data) for e in events]


# -- pure ----------------------------------------------------------------------


def test_selectors_patterns_and_cursor_rules():
    assert parse_selectors(["a", "user/*", "a"], 4) == ["a", "user/*"]
    for bad in ["", "a b", "a=b", "x;y", "é", "gstream.x", "a" * 101, "user*", "*/*/*/*/*"]:
        with pytest.raises(TopicError):
            parse_selectors([bad], 4)
    with pytest.raises(TopicError, match="too many topics"):
        parse_selectors([f"t{i}" for i in range(5)], 4)
    p = Pattern("user/*/inbox")
    assert p.match(["user", "42", "inbox"]) and not p.match(["user", "42"])
    assert not p.match(["user", "42", "inbox", "x"])
    cur = encode_cursor({"a": "5", "user/*": "7"})
    assert cur == "1;a=5;user/*=7"
    assert parse_cursor(cur, ["a", "user/*", "b"]) == {"a": "5", "user/*": "7"}
    assert parse_cursor("1;zz=3", ["a"]) == {}  # a selector no longer asked for is ignored
    for bad in ["2;a=1", "a=1", "1;a", "1;a=x", "1;a=1;a=2", "1;a=" + "9" * 21,
                "1;" + "a=1;" * 2000]:
        with pytest.raises(TopicError):
            parse_cursor(bad, ["a"])
    assert len("1;" + "a=1;" * 2000) > MAX_CURSOR


def test_registry_window_expiry_and_idle_records():
    clock = [0.0]
    reg = TopicRegistry(3, 10, first=1, max_idle=2, clock=lambda: clock[0])
    view = object()
    reg.join("a", "k", view)
    for topic in ["a", "b", "a", "c", "c"]:  # numbers 1..5
        reg.append(topic, topic.encode())
    assert [e.num for _, e in reg.since({"a": 0})] == [3]  # 1 left the window
    assert reg.status("a", 0) == "expired" and reg.status("a", 1) == "ok"
    assert reg.status("b", 2) == "ok" and reg.status("b", 1) == "expired"  # b's 2 left
    assert reg.status("a", 6) == "unknown" and reg.status("a", -5) == "unknown"
    assert reg.status("*", 2) == "ok" and reg.status("*", 1) == "expired"
    reg.leave("a", "k", view)
    clock[0] = 11  # past max_age: window and idle records expire
    assert reg.status("c", 5) == "ok"
    assert reg.status("c", 4) == "expired"
    assert "b" not in reg.records and reg.forgot_upto == 2  # idle past max_age: forgotten
    assert reg.status("b", 1) == "expired" and reg.status("b", 2) == "ok"
    reg.join("b", "k2", view)  # a new record for a forgotten topic: what it lost is unknown
    assert reg.status("b", 1) == "expired" and reg.status("b", 2) == "ok"


# -- over sockets ---------------------------------------------------------------


def test_two_topics_and_default_topic_on_one_stream(serve):
    broker, srv = start(serve, topic="news", first_id=1)
    s = SSEStream(srv.port, "/?topic=news&topic=user/1")
    assert s.status == 200
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    plain = SSEStream(srv.port, "/")  # the single-topic stream of the default topic
    assert wait_until(lambda: broker.subscriber_count == 2, 5)
    broker.publish("headline")  # default topic
    broker.publish("hi you", topic="user/1")
    broker.publish("not yours", topic="user/2")
    broker.publish(Event(data="typing", name="typing"), topic="user/1")
    got = s.events(3)
    assert data_of(got) == [("news", "headline"), ("user/1", "hi you"), ("user/1#typing", "typing")]
    assert all(e.last_event_id.startswith("1;news=") for e in got)
    first = plain.next_event()  # the default topic's own ids, unchanged
    assert (first.event, first.data, first.last_event_id) == ("message", "headline", "1")
    assert broker.topic_subscribers("user/1") == 1 and broker.stats()["topic_streams"] == 1
    s.close()
    plain.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 5)
    assert broker.topic_subscribers("user/1") == 0


def test_pattern_delivers_each_event_once(serve):
    broker, srv = start(serve)
    s = SSEStream(srv.port, "/?topic=user/*&topic=user/1")
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    broker.publish("one", topic="user/1")
    broker.publish("two", topic="user/2")
    broker.publish("deep", topic="user/2/x")
    broker.publish("three", topic="user/3")
    got = s.events(3)
    assert data_of(got) == [("user/1", "one"), ("user/2", "two"), ("user/3", "three")]
    cursor = parse_cursor(got[-1].last_event_id, ["user/*", "user/1"])
    assert int(cursor["user/*"]) > int(cursor["user/1"])
    s.close()


class Collect:
    """Run a gstream SSEClient in a greenlet, collecting its events."""

    def __init__(self, url, **kw):
        self.client = SSEClient(url, reconnect=False, timeout=5, **kw)
        self.events = []
        self.g = gevent.spawn(self._run)

    def _run(self):
        for ev in self.client:
            self.events.append(ev)

    def wait(self, n, timeout=10):
        assert wait_until(lambda: len(self.events) >= n, timeout), self.events
        return self.events[:n]

    def close(self):
        self.client.close()
        self.g.kill(block=True, timeout=5)


def test_resume_replays_every_topic_exactly(serve):
    broker, srv = start(serve)
    url = f"http://127.0.0.1:{srv.port}/?topic=a&topic=b&topic=c/*"
    first = Collect(url)
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    sent = []
    for i in range(6):
        topic = ["a", "b", "c/x"][i % 3]
        broker.publish(f"{topic}:{i}", topic=topic)
        sent.append(f"{topic}:{i}")
    seen = first.wait(4)
    first.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 5)
    for i in range(6, 12):  # published while away, on every topic
        topic = ["a", "b", "c/y"][i % 3]
        broker.publish(f"{topic}:{i}", topic=topic)
        sent.append(f"{topic}:{i}")
    broker.publish("elsewhere", topic="d")
    second = Collect(url, last_event_id=seen[-1].last_event_id)
    rest = second.wait(8)
    broker.publish("live", topic="b")
    rest = second.wait(9)
    second.close()
    assert [e.data for e in seen + rest] == sent + ["live"]


def test_resume_of_a_never_seen_topic_and_previous_life(serve):
    broker, srv = start(serve, first_id=1000)
    s = SSEStream(srv.port, "/?topic=a&topic=b")
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    broker.publish("a1", topic="a")
    first = s.next_event()
    s.close()
    broker.publish("b1", topic="b")  # b: nothing seen on this stream before
    s2 = SSEStream(srv.port, "/?topic=a&topic=b", {"Last-Event-ID": first.last_event_id})
    assert data_of([s2.next_event()]) == [("b", "b1")]
    s2.close()
    # A cursor from a previous broker life (numbers below this life's first): reset, not a gap.
    s3 = SSEStream(srv.port, "/?topic=a&topic=b", {"Last-Event-ID": "1;a=5;b=5"})
    resets = [json.loads(e.data) for e in s3.events(2)]
    assert {r["topic"] for r in resets} == {"a", "b"} and {r["reason"] for r in resets} == {"unknown"}
    s3.close()


def test_expired_topic_is_reset_the_others_replayed(serve):
    broker, srv = start(serve, topic_history=4)
    s = SSEStream(srv.port, "/?topic=busy&topic=calm")
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    broker.publish("c0", topic="calm")
    cursor = s.next_event().last_event_id
    s.close()
    for i in range(6):
        broker.publish(f"b{i}", topic="busy")
    broker.publish("c1", topic="calm")
    s2 = SSEStream(srv.port, "/?topic=busy&topic=calm", {"Last-Event-ID": cursor})
    got = s2.events(2)
    assert got[0].event == RESET_EVENT and json.loads(got[0].data)["topic"] == "busy"
    assert data_of(got[1:]) == [("calm", "c1")]
    s2.close()


# -- authorization ----------------------------------------------------------------


def allow_own(environ, topic):
    user = environ.get("HTTP_X_USER", "")
    return topic == "public" or topic == f"user/{user}"


def test_authorization_allowed_partly_denied_all_denied(serve):
    broker, srv = start(serve, topic="public", authorize=allow_own)
    ok = SSEStream(srv.port, "/?topic=public&topic=user/7", {"X-User": "7"})
    part = SSEStream(srv.port, "/?topic=user/7&topic=user/8&topic=user/*", {"X-User": "8"})
    assert ok.status == 200 and part.status == 200
    denied = part.next_event()
    assert denied.event == DENIED_EVENT
    assert json.loads(denied.data) == {"topics": ["user/7", "user/*"]}
    none = SSEStream(srv.port, "/?topic=user/7", {"X-User": "8"})
    assert none.status == 403
    legacy_ok = SSEStream(srv.port, "/")  # the default topic "public" is allowed
    assert legacy_ok.status == 200
    assert wait_until(lambda: broker.subscriber_count == 3, 5)
    broker.publish("for 7", topic="user/7")
    broker.publish("for 8", topic="user/8")
    assert data_of([ok.next_event()]) == [("user/7", "for 7")]
    assert data_of([part.next_event()]) == [("user/8", "for 8")]
    for s in (ok, part, none, legacy_ok):
        s.close()


def test_authorization_of_the_default_topic_and_a_failing_hook(serve):
    def hook(environ, topic):
        if topic == "boom":
            raise RuntimeError("hook bug")
        return topic != "news"

    broker, srv = start(serve, topic="news", authorize=hook)
    assert SSEStream(srv.port, "/").status == 403
    s = SSEStream(srv.port, "/?topic=boom&topic=ok")
    assert s.status == 200 and json.loads(s.next_event().data) == {"topics": ["boom"]}
    s.close()


# -- hostile input -------------------------------------------------------------------


@pytest.mark.parametrize("query,header,reason", [
    ("&".join(f"topic=t{i}" for i in range(17)), None, b"too many topics"),
    ("topic=a%20b", None, b"bad topic name"),
    ("topic=user*", None, b"bad topic pattern"),
    ("topic=gstream.x", None, b"reserved"),
    ("topic=", None, b"bad topic name"),
    ("topic=a", "1;a=" + "9" * 5000, b"longer than"),
    ("topic=a", "1;a=1;" + "b=1;" * 1200, b"longer than"),
    ("topic=a", "garbage", b"not a gstream topic cursor"),
    ("topic=a", "1;a=zz", b"malformed"),
])
def test_hostile_requests_get_a_400_with_the_reason(serve, query, header, reason):
    broker, srv = start(serve)
    r = requests.get(f"http://127.0.0.1:{srv.port}/?{query}", timeout=5,
                     headers={"Last-Event-ID": header} if header else None)
    assert r.status_code == 400 and reason in r.content
    assert broker.subscriber_count == 0


def test_bad_topic_name_on_publish_raises(serve):
    broker = SSEBroker()
    for bad in ["a b", "x*", "gstream.missed", "a" * 200]:  # "" is the default topic
        with pytest.raises(TopicError):
            broker.publish("x", topic=bad)
    broker.close()


def test_pattern_count_is_bounded(serve):
    broker, srv = start(serve, max_patterns=2)
    a = SSEStream(srv.port, "/?topic=a/*&topic=b/*")
    assert a.status == 200
    c = SSEStream(srv.port, "/?topic=c/*")
    assert c.status == 503
    a.close()
    c.close()


# -- the JWT example of docs/topics.md ---------------------------------------------


def test_jwt_example_from_the_docs(serve):
    import re
    import time
    from pathlib import Path

    import jwt  # PyJWT: in the test extra
    doc = (Path(__file__).resolve().parent.parent / "docs" / "topics.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "import jwt" in b)
    ns: dict = {}
    exec(block, ns)
    broker = ns["broker"]
    srv = serve(broker.subscribe)

    def token(subscribe, exp=60):
        return jwt.encode({"subscribe": subscribe, "exp": int(time.time()) + exp},
                          ns["SECRET"], algorithm="HS256")

    good = token(["news", "user/42", "room/*"])
    s = SSEStream(srv.port, f"/?topic=news&topic=user/42&topic=user/43&topic=room/7&token={good}")
    assert s.status == 200
    assert json.loads(s.next_event().data) == {"topics": ["user/43"]}
    s.close()
    via_cookie = SSEStream(srv.port, "/?topic=user/42", {"Cookie": f"jwt={good}"})
    assert via_cookie.status == 200
    via_cookie.close()
    for bad in ["", token(["news"], exp=-10), "not.a.jwt", jwt.encode(
            {"subscribe": ["user/42"], "exp": int(time.time()) + 60}, "w" * 40, algorithm="HS256")]:
        r = requests.get(f"http://127.0.0.1:{srv.port}/?topic=user/42&token={bad}", timeout=5)
        assert r.status_code == 403, bad
    broker.close()


# -- any input: a TopicError or a valid answer, nothing else ---------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=120), max_size=20), st.text(max_size=300))
def test_any_selectors_and_cursor_are_refused_cleanly_or_parsed(values, raw):
    try:
        sels = parse_selectors(values, 16)
    except TopicError:
        return
    assert 1 <= len(sels) <= 16 and len(set(sels)) == len(sels)
    try:
        cursor = parse_cursor(raw, sels)
    except TopicError:
        return
    assert set(cursor) <= set(sels)
    assert parse_cursor(encode_cursor(cursor), sels) == cursor  # round trip


def test_topic_streams_share_the_broker_caps_eviction_drops_and_close(serve):
    broker, srv = start(serve, principal=lambda environ: "alice", max_subscribers=2,
                        default_buffer=2)
    first = SSEStream(srv.port, "/?topic=a&subscriber_id=tab")
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    second = SSEStream(srv.port, "/?topic=a&topic=b&subscriber_id=tab")  # same caller and id
    ends = first.read_until_end(5)
    assert [e.event for e in ends] == ["gstream.evicted"]
    plain = SSEStream(srv.port, "/")
    assert wait_until(lambda: broker.subscriber_count == 2, 5)
    assert requests.get(f"http://127.0.0.1:{srv.port}/?topic=a", timeout=5).status_code == 503
    assert broker.topic_subscribers("a") == 1  # the evicted stream left its topics
    broker.close()
    assert [e.event for e in second.read_until_end(5)] == ["done"]
    assert [e.event for e in plain.read_until_end(5)] == ["done"]
    assert broker.stats()["topic_streams"] == 0 and broker.topic_subscribers("b") == 0
    for s in (first, second, plain):
        s.close()


def test_a_slow_topic_stream_drops_oldest_and_is_told(serve):
    broker, srv = start(serve, default_buffer=2)
    s = SSEStream(srv.port, "/?topic=a")
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    for i in range(5):  # no yield between: the reader cannot run, its queue holds 2
        broker.publish(str(i), topic="a")
    got = s.events(3)
    assert (got[0].event, json.loads(got[0].data)) == ("gstream.missed", {"missed": 3})
    assert [e.data for e in got[1:]] == ["3", "4"]
    assert broker.stats()["dropped"] == 3
    s.close()
