"""Presence of multi-topic SSE streams (``?topic=a&topic=b`` with ``BrokerConfig.presence``):
one join per allowed concrete topic, every one left when the stream ends (FIN/RST noticed
at once under gstream's Server), per-topic refusals, ``<topic>#gstream.join`` events that
leave the cursor alone, and one presence watcher per topic in use (docs/presence.md)."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import pytest

from gstream import Event
from gstream.broker import DENIED_EVENT, SSEBroker
from gstream.presence import MemoryPresence, PresenceConfig, Watcher
from tests.helpers import SSEStream, wait_until

RST = struct.pack("ii", 1, 0)


def _user(environ: dict[str, Any]) -> str | None:
    if "gstream.test.user" in environ:  # WSGI calls without a socket: no query to parse
        return str(environ["gstream.test.user"])
    return parse_qs(environ.get("QUERY_STRING", "")).get("user", [None])[0]


def _no_secrets(environ: dict[str, Any], topic: str) -> bool:
    return not topic.startswith("secret")


class CountingPresence(MemoryPresence):
    """MemoryPresence that counts the watchers registered now, per topic."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.watching: dict[str | None, int] = {}
        self.now = 0
        self.most = 0

    def watch(self, topic: str | None, callback: Watcher) -> Callable[[], None]:
        stop = super().watch(topic, callback)
        self.watching[topic] = self.watching.get(topic, 0) + 1
        self.now += 1
        self.most = max(self.most, self.now)
        done = False

        def unwatch() -> None:
            nonlocal done
            if not done:
                done = True
                self.now -= 1
                self.watching[topic] -= 1
                if not self.watching[topic]:
                    del self.watching[topic]
            stop()

        return unwatch


def _broker(**kw: Any) -> SSEBroker:
    kw.setdefault("heartbeat_interval", None)  # departures must be noticed without a write
    return SSEBroker(topic="news", principal=_user, authorize=_no_secrets, **kw)


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_topic_stream_joins_each_concrete_topic_and_leaves_all_at_fin_or_rst(
        gserver: Any, how: str) -> None:
    p = MemoryPresence()
    broker = _broker(presence=p)
    port = gserver(broker.subscribe).address[1]
    alice = SSEStream(port, "/?user=alice&topic=news&topic=room/1&topic=user/*&topic=secret/x")
    assert alice.status == 200
    assert json.loads(alice.next_event().data) == {"topics": ["secret/x"]}
    tab = SSEStream(port, "/?user=alice&subscriber_id=tab2&topic=room/1")
    bob = SSEStream(port, "/?user=bob&topic=room/1&topic=room/2")
    legacy = SSEStream(port, "/?user=carol")  # the default topic, as before
    assert wait_until(lambda: p.connections == 6)
    assert p.count("news") == 2 and p.count("room/1") == 2 and p.count("room/2") == 1
    assert p.members("room/1").members["alice"].connections == 2
    assert p.count("user/*") == 0 and p.count("secret/x") == 0  # patterns, denied: not joined
    assert sorted(p.topics()) == ["news", "room/1", "room/2"]
    streams = [alice, tab, bob, legacy]
    for s in streams:
        if how == "rst":
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    # Idle, no heartbeat: only the detached stream's read watcher can notice.
    alice.close()
    assert wait_until(lambda: p.connections == 4, 5)
    assert p.count("news") == 1 and p.count("room/1") == 2  # alice's other tab stays
    assert p.members("room/1").members["alice"].connections == 1
    bob.close()
    tab.close()
    assert wait_until(lambda: p.connections == 1, 5)
    assert p.topics() == ["news"]
    legacy.close()
    assert wait_until(lambda: p.connections == 0, 5)
    assert broker.subscriber_count == 0
    broker.close()


def test_topic_presence_events_are_typed_by_topic_and_keep_the_cursor(gserver: Any) -> None:
    p = CountingPresence()
    broker = _broker(presence=p, presence_events=True,
                     presence_meta=lambda env: {"name": _user(env)})
    port = gserver(broker.subscribe).address[1]
    w = SSEStream(port, "/?user=w&topic=room/1&topic=news")
    joins = [w.next_event(), w.next_event()]  # w's own joins, in join order
    assert [(e.event, json.loads(e.data)["member"]) for e in joins] == [
        ("room/1#gstream.join", "w"), ("news#gstream.join", "w")]
    assert not joins[1].id_field_seen
    broker.publish("hello", topic="room/1")
    ev = w.next_event()
    assert (ev.event, ev.data) == ("room/1", "hello") and ev.id_field_seen
    cursor = ev.last_event_id
    # Only room/1 is watched per topic; "news" has the broker's own watcher.
    assert p.watching == {"news": 1, "room/1": 1}
    leaves = SSEStream(port, "/?user=l&topic=room/1&event=gstream.leave")
    assert json.loads(w.next_event().data)["member"] == "l"
    alice = SSEStream(port, "/?user=alice&topic=room/1&topic=room/2")
    ev = w.next_event()
    assert ev.event == "room/1#gstream.join"
    data = json.loads(ev.data)
    assert (data["member"], data["topic"], data["count"], data["meta"]) == (
        "alice", "room/1", 3, {"name": "alice"})
    assert not ev.id_field_seen and ev.last_event_id == cursor  # no id: the cursor stays
    legacy = SSEStream(port, "/?user=carol")  # a default-topic subscriber joins "news"
    ev = w.next_event()
    assert ev.event == "news#gstream.join" and json.loads(ev.data)["member"] == "carol"
    assert p.watching == {"news": 1, "room/1": 1, "room/2": 1}
    alice.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    alice.close()
    ev = w.next_event()
    assert ev.event == "room/1#gstream.leave" and json.loads(ev.data)["count"] == 2
    assert wait_until(lambda: "room/2" not in p.watching, 5)  # its last stream is gone
    ev = leaves.next_event()  # the event filter applies to the event's own name
    assert ev.event == "room/1#gstream.leave" and json.loads(ev.data)["member"] == "alice"
    # Exact resume after presence events: the cursor held names "hello" as the last seen.
    w.close()
    assert wait_until(lambda: p.count("room/1") == 1, 5)
    broker.publish("missed", topic="room/1")
    w2 = SSEStream(port, "/?user=w&topic=room/1&topic=news", {"Last-Event-ID": cursor})
    got = [w2.next_event() for _ in range(2)]
    assert ("room/1", "missed") in [(e.event, e.data) for e in got]
    assert "hello" not in [e.data for e in got]
    for s in (w2, leaves, legacy):
        s.close()
    assert wait_until(lambda: p.connections == 0, 5)
    assert p.watching == {"news": 1}
    broker.close()
    assert p.watching == {}


def test_a_presence_refusal_denies_that_topic_and_503_when_none_is_left(gserver: Any) -> None:
    p = MemoryPresence(PresenceConfig(max_members=1))
    broker = _broker(presence=p, presence_events=True)
    port = gserver(broker.subscribe).address[1]
    first = SSEStream(port, "/?user=u1&topic=room/1")
    assert first.status == 200
    assert wait_until(lambda: p.count("room/1") == 1)
    second = SSEStream(port, "/?user=u2&topic=room/1&topic=room/2&topic=secret/y")
    assert second.status == 200
    ev = second.next_event()
    assert ev.event == DENIED_EVENT
    assert json.loads(ev.data) == {"topics": ["secret/y", "room/1"],
                                   "presence_refused": ["room/1"]}
    assert p.count("room/2") == 1 and p.members("room/1").members.keys() == {"u1"}
    assert broker.topic_subscribers("room/1") == 1  # the refused topic is not served
    third = SSEStream(port, "/?user=u3&topic=room/1")
    assert third.status == 503 and "retry-after" in third.headers
    third.close()
    broker.publish(Event(data="one"), topic="room/1")
    broker.publish(Event(data="two"), topic="room/2")
    ev = second.next_event()
    assert ev.event == "room/2#gstream.join"  # its own join, then only room/2 data
    assert (second.next_event().data) == "two"
    for s in (first, second):
        s.close()
    assert wait_until(lambda: p.connections == 0, 5)
    broker.close()


def test_no_watcher_outlives_its_topic_with_100000_private_topics(gserver: Any) -> None:
    p = CountingPresence()
    broker = _broker(presence=p, presence_events=True)
    port = gserver(broker.subscribe).address[1]
    # 100,000 private topics, 1,000 open at a time, through the broker's WSGI
    # entry (stream()/close(): the bookkeeping, without 100,000 sockets).
    for wave in range(100):
        bodies = []
        for i in range(1000):
            n = wave * 1000 + i
            env = {"REQUEST_METHOD": "GET", "gstream.test.user": f"u{n}",
                   "QUERY_STRING": f"topic=user/{n}"}
            status, _, body = broker.stream(env)
            assert status == "200 OK"
            bodies.append(body)
        assert len(p.watching) == 1001 and p.connections == 1000
        for body in bodies:
            body.close()
        assert p.watching == {"news": 1} and p.connections == 0
    assert p.most == 1001
    assert broker.stats()["topic_streams"] == 0
    # And over real sockets, the same per topic.
    socks = [SSEStream(port, f"/?user=s{i}&topic=user/{i}&topic=shared") for i in range(20)]
    assert wait_until(lambda: p.connections == 20 * 2)
    assert len(p.watching) == 22
    for s in socks:
        s.close()
    assert wait_until(lambda: p.watching == {"news": 1}, 5)
    broker.close()


def test_presence_max_members_of_a_topic_at_past_and_back_under_defaults(gserver: Any) -> None:
    # The default bound (10,000 members a topic): 9,999 listed through the API,
    # the 10,000th over a socket is served, the 10,001st is refused that topic
    # (503 when it was the only one, listed in gstream.denied otherwise), a
    # second tab of a listed member is not a new member, and a member leaving
    # by RST frees its place.
    p = MemoryPresence()
    limit = p.config.max_members
    assert limit == 10_000
    for i in range(limit - 1):
        p.join("room/1", f"pre{i}")
    broker = _broker(presence=p)
    port = gserver(broker.subscribe).address[1]
    at = SSEStream(port, "/?user=last&topic=room/1")
    assert at.status == 200
    assert wait_until(lambda: p.count("room/1") == limit)
    past = SSEStream(port, "/?user=over&topic=room/1")
    assert past.status == 503 and "retry-after" in past.headers
    past.close()
    mixed = SSEStream(port, "/?user=over&topic=room/1&topic=room/2")
    assert mixed.status == 200
    assert json.loads(mixed.next_event().data) == {"topics": ["room/1"],
                                                   "presence_refused": ["room/1"]}
    tab = SSEStream(port, "/?user=last&subscriber_id=tab2&topic=room/1")
    assert tab.status == 200  # not a new member
    assert wait_until(lambda: p.members("room/1").members["last"].connections == 2)
    for s in (at, tab):  # the member's every connection goes by RST
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        s.close()
    assert wait_until(lambda: p.count("room/1") == limit - 1, 5)
    back = SSEStream(port, "/?user=over&subscriber_id=again&topic=room/1")
    assert back.status == 200
    assert wait_until(lambda: "over" in p.members("room/1").members)
    assert p.count("room/1") == limit
    for s in (mixed, back):
        s.close()
    assert wait_until(lambda: p.count("room/2") == 0 and broker.subscriber_count == 0, 5)
    assert p.count("room/1") == limit - 1
    broker.close()


@pytest.mark.parametrize("topics", ["&topic=room/1&topic=room/2", ""])
def test_a_stream_replacing_its_own_at_max_connections_is_served(gserver: Any, topics: str) -> None:
    # A member with the default 32 connections (the cap) reconnects one of
    # them with its subscriber_id (the newer stream replaces the older). The
    # replaced one leaves presence for it: the new stream is served and listed
    # (it used to be refused, 503, after its predecessor had been evicted:
    # no stream at all until the retry); a 33rd distinct stream is refused.
    p = MemoryPresence()
    cap = p.config.max_connections
    assert cap == 32
    broker = _broker(presence=p)
    port = gserver(broker.subscribe).address[1]
    topic = "room/1" if topics else "news"
    streams = [SSEStream(port, f"/?user=alice&subscriber_id=s{i}{topics}") for i in range(cap)]
    assert all(s.status == 200 for s in streams)
    assert wait_until(lambda: p.members(topic).members["alice"].connections == cap)
    again = SSEStream(port, f"/?user=alice&subscriber_id=s0{topics}")
    assert again.status == 200
    assert streams[0].read_until_end()[-1].event == "gstream.evicted"
    assert wait_until(lambda: p.members(topic).members["alice"].connections == cap)
    extra = SSEStream(port, f"/?user=alice&subscriber_id=x{topics}")
    assert extra.status == 503  # every concrete topic refused
    extra.close()
    for s in streams + [again]:
        s.close()
    assert wait_until(lambda: p.connections == 0, 5)
    broker.close()
