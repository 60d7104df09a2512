"""Topic streams through the Redis backplane: two `python -m gstream serve` processes,
one Redis stream per topic, one cursor resuming every topic exactly on another
process and after a kill -9 and restart (docs/topics.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.helpers import SSEStream, wait_until
from tests.redis_fixture import RedisServer
from tests.test_redis_backplane import Node

pytestmark = pytest.mark.redis

APP = "tests.apps.topic_feed:make_app()"
TOPICS = "?topic=a&topic=b&topic=feed"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()


def node(redis_server: RedisServer) -> Node:
    n = Node(redis_server.url, 0, app=APP)
    n.wait()
    return n


def open_stream(n: Node, query: str = TOPICS, cursor: str | None = None) -> SSEStream:
    before = n.stats()["broker"]["topic_streams"]
    s = SSEStream(n.port, "/events" + query, {"Last-Event-ID": cursor} if cursor else None)
    assert s.status == 200
    # Registered (and its topics attached to Redis) before anything is published.
    assert wait_until(lambda: n.stats()["broker"]["topic_streams"] > before, 10)
    return s


def per_topic(events: list) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e.event, []).append(e.data)
    return out


def test_topics_across_processes_and_exact_resume_on_the_other(redis_server: RedisServer) -> None:
    a, b = node(redis_server), node(redis_server)
    try:
        s = open_stream(a)
        pub(b, "a", 3, "a1")
        pub(a, "b", 3, "b1")
        pub(b, "feed", 2, "f1")  # the broker's default topic, named like any other
        first = s.events(8, timeout=10)
        assert per_topic(first) == {"a": ["a1:0", "a1:1", "a1:2"], "b": ["b1:0", "b1:1", "b1:2"],
                                    "feed": ["f1:0", "f1:1"]}
        s.close()
        # The client "saw" only the first five; it resumes on the other process.
        cursor = first[4].last_event_id
        pub(a, "a", 2, "a2")
        pub(b, "b", 2, "b2")
        pub(a, "feed", 1, "f2")
        pub(a, "c", 1, "other")  # a topic nobody asked for
        s2 = open_stream(b, cursor=cursor)
        rest = s2.events(8, timeout=10)
        want = per_topic(first[5:])
        for topic, items in {"a": ["a2:0", "a2:1"], "b": ["b2:0", "b2:1"], "feed": ["f2:0"]}.items():
            want.setdefault(topic, []).extend(items)
        assert per_topic(rest) == want
        pub(a, "b", 1, "live")
        assert s2.next_event(10).data == "live:0"
        s2.close()
    finally:
        a.stop()
        b.stop()


def pub(n: Node, topic: str, count: int, tag: str) -> list[str]:
    r = requests.get(f"{n.url}/publish", params={"topic": topic, "count": count, "tag": tag},
                     timeout=10)
    assert r.status_code == 200, r.text
    ids: list[str] = r.json()["ids"]
    assert all(ids)
    return ids


def test_resume_after_kill_and_restart(redis_server: RedisServer) -> None:
    a, b = node(redis_server), node(redis_server)
    try:
        s = open_stream(a, "?topic=x&topic=y")
        pub(b, "x", 2, "x1")
        pub(b, "y", 1, "y1")
        got = s.events(3, timeout=10)
        cursor = got[-1].last_event_id
        a.p.kill()  # kill -9: no goodbye
        a.p.wait(10)
        s.close()
        pub(b, "y", 2, "y2")
        pub(b, "x", 1, "x2")
        a.stop()
        a = node(redis_server)  # a new process, a new broker life
        s2 = open_stream(a, "?topic=x&topic=y", cursor=cursor)
        assert per_topic(s2.events(3, timeout=10)) == {"y": ["y2:0", "y2:1"], "x": ["x2:0"]}
        s2.close()
    finally:
        a.stop()
        b.stop()


def test_authorization_patterns_and_bad_cursor_on_redis(redis_server: RedisServer) -> None:
    a = node(redis_server)
    try:
        s = open_stream(a, "?topic=secret/1&topic=open")
        denied = s.next_event(10)
        assert denied.event == "gstream.denied" and json.loads(denied.data) == {"topics": ["secret/1"]}
        pub(a, "secret/1", 1, "hidden")
        pub(a, "open", 1, "shown")
        assert s.next_event(10).data == "shown:0"
        s.close()
        r = requests.get(f"{a.url}/events?topic=secret/2", timeout=10)
        assert r.status_code == 403
        r = requests.get(f"{a.url}/events?topic=user/*", timeout=10)
        assert r.status_code == 400 and b"patterns need the in-memory backplane" in r.content
        r = requests.get(f"{a.url}/events?topic=open", headers={"Last-Event-ID": "1;open=abc"},
                         timeout=10)
        assert r.status_code == 400 and b"malformed" in r.content
        # A well-formed position Redis never issued: reset for that topic, the stream goes on.
        s3 = open_stream(a, "?topic=open", cursor="1;open=99999999999999-0")
        reset = s3.next_event(10)
        assert reset.event == "gstream.reset" and json.loads(reset.data)["reason"] == "unknown"
        s3.close()
    finally:
        a.stop()


def check_cursors(events: list, start: dict[str, str]) -> dict[str, str]:
    """Each event's cursor moves only its own topic's position, forward (Redis ids)."""
    from gstream.topics import parse_cursor

    pos = dict(start)
    for e in events:
        cur = parse_cursor(e.last_event_id, list(pos))
        topic = e.event.split("#")[0]
        assert {t: p for t, p in cur.items() if t != topic} == {
            t: p for t, p in pos.items() if t != topic}, (e, pos)
        old = tuple(map(int, pos[topic].split("-")))
        assert tuple(map(int, cur[topic].split("-"))) > old, (e, pos)
        pos = cur
    return pos


def test_resume_while_publishing_keeps_every_cursor_exact(
        redis_server: RedisServer, serve: Any) -> None:
    # In one process: the resume reads Redis (XRANGE, it yields) while events
    # keep arriving live; every frame's cursor must still be exactly what the
    # client has, and a second resume from any of them must neither repeat nor skip.
    import gevent

    from gstream.backplane.redis import RedisBackplane
    from gstream.broker import SSEBroker
    from gstream.events import Event

    backplane = RedisBackplane(redis_server.url, block=0.5, publish_wait=5.0)
    broker = SSEBroker(topic="default", backplane=backplane, heartbeat_interval=0.2,
                       history_size=0)
    app = serve(broker.subscribe)
    sent: dict[str, list[str]] = {"p": [], "q": []}

    def publish(n: int, topic: str) -> None:
        for _ in range(n):
            data = f"{topic}{len(sent[topic])}"
            sent[topic].append(data)
            broker.publish(Event(data=data), topic=topic)
            gevent.sleep(0)

    try:
        s = SSEStream(app.port, "/?topic=p&topic=q")
        assert wait_until(lambda: broker.stats()["topic_streams"] == 1, 10)
        publish(3, "p")
        publish(3, "q")
        first = s.events(6, timeout=10)
        cursor = first[-1].last_event_id
        s.close()
        publish(40, "p")  # behind the client: replayed from Redis
        publish(40, "q")
        live = gevent.spawn(lambda: [publish(1, t) for _ in range(40) for t in ("p", "q")])
        s2 = SSEStream(app.port, "/?topic=p&topic=q", {"Last-Event-ID": cursor})
        got = s2.events(100, timeout=20)
        s2.close()
        live.join(20)
        from gstream.topics import parse_cursor

        check_cursors(got, parse_cursor(cursor, ["p", "q"]))
        cut = got[-1].last_event_id  # resume again from where the second stream stopped
        s3 = SSEStream(app.port, "/?topic=p&topic=q", {"Last-Event-ID": cut})
        rest = s3.events(160 - 100, timeout=20)
        s3.close()
        check_cursors(rest, parse_cursor(cut, ["p", "q"]))
        received = per_topic(first + got + rest)
        assert received == sent  # every event of both topics once, in order
    finally:
        broker.close()
        backplane.close()


def test_a_stalled_redis_answers_a_new_16_topic_stream_in_one_timeout(serve: Any) -> None:
    # A stream of 16 topics nobody here reads yet attaches each one (reads its
    # tail in Redis). With Redis asleep, every read used to wait the full
    # socket_timeout in turn: 16 x socket_timeout before any answer (80 s with
    # the defaults; here the stall's length, then 200). Now the first topic
    # that cannot be attached ends the subscribe: 503 + Retry-After after one
    # socket_timeout; the streams already open keep their heartbeats; once
    # Redis is back the same request is served.
    import socket
    import time

    from gstream.backplane.redis import RedisBackplane
    from gstream.broker import SSEBroker
    from tests.test_redis_scale import _stall

    timeout, stall_for = 1.0, 8.0
    srv = RedisServer(extra_args=("--enable-debug-command", "yes"))
    srv.start()
    bp = RedisBackplane(srv.url, socket_timeout=timeout, backoff=0.05, backoff_cap=0.5)
    broker = SSEBroker(topic="feed", backplane=bp, heartbeat_interval=0.2)
    running = serve(broker.subscribe)
    query = "/?" + "&".join(f"topic=t{i}" for i in range(16))
    stall: socket.socket | None = None
    warm = SSEStream(running.port, "/?topic=warm")
    try:
        assert warm.status == 200
        assert wait_until(lambda: broker.topic_subscribers("warm") == 1, 10)
        stall = _stall(srv.port, "debug-sleep", stall_for)
        stalled_at = time.monotonic()
        assert wait_until(lambda: redis_busy(srv.port), 5)
        t0 = time.monotonic()
        r = requests.get(f"http://127.0.0.1:{running.port}{query}", timeout=30, stream=True)
        took = time.monotonic() - t0
        assert r.status_code == 503, (r.status_code, took)
        assert r.headers.get("Retry-After") and b"unavailable" in r.content
        assert took < stall_for - 2, f"answered after {took:.1f}s"
        r.close()
        seen = b""
        for _ in range(50):  # the open stream's heartbeats go on (bounded: 50 chunks)
            chunk = warm.reader.read_chunk()
            assert chunk is not None
            seen += chunk
            if b"heartbeat" in chunk:
                break
        assert b": heartbeat" in seen
        assert broker.subscriber_count == 1 and broker.stats()["topic_streams"] == 1
        assert time.monotonic() - stalled_at < stall_for  # all of it inside the stall
        assert wait_until(lambda: not redis_busy(srv.port), stall_for + 10)
        s = SSEStream(running.port, query, timeout=15)
        assert s.status == 200
        s.close()
    finally:
        warm.close()
        if stall is not None:
            stall.close()
        broker.close()
        bp.close()
        srv.stop()


def test_a_stalled_redis_answers_a_16_topic_resume_ahead_of_this_process_in_one_timeout(
        serve: Any) -> None:
    # A client resuming 16 topics with positions this process has not
    # delivered (it saw them on a faster process) makes each catch-up read
    # the topic's tail in Redis. With Redis asleep they used to time out one
    # after the other (16 x socket_timeout, 80 s with the defaults) and then
    # serve 16 resets; now the first unanswered read is a 503 + Retry-After,
    # and the client's retry resumes once Redis answers.
    import socket
    import time

    from gstream.backplane.redis import RedisBackplane
    from gstream.broker import SSEBroker
    from tests.test_redis_scale import _stall

    timeout, stall_for = 1.0, 8.0
    srv = RedisServer(extra_args=("--enable-debug-command", "yes"))
    srv.start()
    bp = RedisBackplane(srv.url, socket_timeout=timeout, backoff=0.05, backoff_cap=0.5)
    broker = SSEBroker(topic="feed", backplane=bp, heartbeat_interval=0.2)
    running = serve(broker.subscribe)
    topics = [f"t{i}" for i in range(16)]
    query = "/?" + "&".join(f"topic={t}" for t in topics)
    stall: socket.socket | None = None
    warm = SSEStream(running.port, query)  # every topic attached
    try:
        assert warm.status == 200
        assert wait_until(lambda: broker.topic_subscribers("t15") == 1, 10)
        ahead = "1;" + ";".join(f"{t}=99999999999999-0" for t in topics)
        stall = _stall(srv.port, "debug-sleep", stall_for)
        assert wait_until(lambda: redis_busy(srv.port), 5)
        t0 = time.monotonic()
        r = requests.get(f"http://127.0.0.1:{running.port}{query}", timeout=30, stream=True,
                         headers={"Last-Event-ID": ahead})
        took = time.monotonic() - t0
        assert r.status_code == 503, (r.status_code, took)
        assert r.headers.get("Retry-After") and b"unavailable" in r.content
        assert took < stall_for - 2, f"answered after {took:.1f}s"
        r.close()
        assert broker.subscriber_count == 1
        assert wait_until(lambda: not redis_busy(srv.port), stall_for + 10)
        s = SSEStream(running.port, query, {"Last-Event-ID": ahead}, timeout=15)
        assert s.status == 200
        ev = s.next_event(10)  # never issued by Redis: reset, without waiting
        assert ev.event == "gstream.reset" and '"reason":"unknown"' in ev.data
        s.close()
    finally:
        warm.close()
        if stall is not None:
            stall.close()
        broker.close()
        bp.close()
        srv.stop()


def redis_busy(port: int) -> bool:
    """True while Redis does not answer a PING within 0.2 s."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return not s.recv(16).startswith(b"+PONG")
    except OSError:
        return True
