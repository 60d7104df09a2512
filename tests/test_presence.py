"""Presence (gstream/presence.py) in one process: the in-memory store, and Hub rooms
reporting it to real WebSocket clients (gstream's client, raw sockets for FIN/RST)
served by gstream's Server. Cross-process (Redis, kill -9): test_presence_redis.py."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any
from urllib.parse import parse_qs

import gevent
import httpx
import pytest

from gstream import Closed, websocket_app
from gstream.broker import SSEBroker
from gstream.client import SSEClient, connect
from gstream.errors import PresenceRefused
from gstream.hub import Hub, HubConfig
from gstream.presence import MemoryPresence, PresenceChange, PresenceConfig, PresenceEvent
from tests import wsraw
from tests.helpers import SSEStream, wait_until

RST = struct.pack("ii", 1, 0)


# -- the store ---------------------------------------------------------------

def test_two_connections_of_one_member_join_once_and_leave_with_the_last() -> None:
    p = MemoryPresence()
    seen: list[PresenceEvent] = []
    p.watch("room", seen.append)
    a1 = p.join("room", "alice", {"name": "Alice"})
    a2 = p.join("room", "alice", {"name": "Alice (tab 2)"})
    b = p.join("room", "bob")
    b2 = p.join("room", "bob")  # a second connection, no meta: no event
    assert wait_until(lambda: len(seen) == 3)
    assert [(e.kind, e.member, e.count) for e in seen] == [
        (PresenceChange.JOIN, "alice", 1), (PresenceChange.UPDATE, "alice", 1),
        (PresenceChange.JOIN, "bob", 2)]
    assert seen[1].meta == {"name": "Alice (tab 2)"}
    seen.clear()
    snap = p.members("room")
    assert snap.count == 2 and p.count("room") == 2
    assert snap.members["alice"].connections == 2
    assert snap.members["alice"].meta == {"name": "Alice (tab 2)"}  # the latest join's
    p.leave(a1)
    p.leave(a1)  # idempotent
    gevent.sleep(0.05)
    assert seen == [] and p.count("room") == 2  # alice still has a tab
    p.leave(a2)
    assert wait_until(lambda: len(seen) == 1)
    assert (seen[0].kind, seen[0].member, seen[0].count) == (PresenceChange.LEAVE, "alice", 1)
    assert seen[0].meta == {"name": "Alice (tab 2)"}
    p.leave(b)
    assert p.count("room") == 1
    p.leave(b2)
    assert p.count("room") == 0 and p.topics() == [] and p.connections == 0


def test_snapshot_version_orders_events_around_it() -> None:
    p = MemoryPresence()
    seen: list[PresenceEvent] = []
    p.watch(None, seen.append)  # every topic
    p.join("t", "a")
    snap = p.members("t")
    p.join("t", "b")
    p.join("other", "c")
    assert wait_until(lambda: len(seen) == 3)
    newer = [e for e in seen if e.topic == "t" and e.version > snap.version]
    assert [e.member for e in newer] == ["b"]  # "a" is in the snapshot already


@pytest.mark.parametrize(("member", "meta", "reason"), [
    ("", None, "member id"),
    ("x" * 257, None, "member id"),
    ("m", {"blob": "x" * 2000}, "meta"),
    ("m", {"bad": object()}, "meta"),
    ("m", float("nan"), "meta"),
    ("\ud800", None, "member id"),  # a lone surrogate, as json.loads gives for "\ud800"
    ("m", {"name": "\udfff"}, "meta"),
])
def test_hostile_member_ids_and_meta_are_refused(member: str, meta: Any, reason: str) -> None:
    p = MemoryPresence()
    with pytest.raises(PresenceRefused) as exc:
        p.join("t", member, meta)
    assert exc.value.reason == reason
    assert p.connections == 0 and p.topics() == []


def test_bounds_on_members_connections_topics_and_local_connections() -> None:
    p = MemoryPresence(PresenceConfig(max_members=3, max_connections=2, max_topics=2, max_local=7))
    for m in "abc":
        p.join("t", m)
    with pytest.raises(PresenceRefused, match="topic full"):
        p.join("t", "d")
    p.join("t", "a")  # a second connection of a present member is fine...
    with pytest.raises(PresenceRefused, match="connections"):
        p.join("t", "a")  # ...a third is not
    p.join("u", "a")
    with pytest.raises(PresenceRefused, match="topics"):
        p.join("v", "a")
    p.join("u", "b")
    p.join("u", "c")
    with pytest.raises(PresenceRefused, match="local"):
        p.join("u", "e")
    assert p.count("t") == 3 and p.count("u") == 3 and p.connections == 7


def test_a_failing_watcher_does_not_stop_the_others() -> None:
    p = MemoryPresence()
    seen: list[str] = []

    def broken(event: PresenceEvent) -> None:
        raise RuntimeError("boom")

    p.watch("t", broken)
    unwatch = p.watch("t", lambda e: seen.append(e.member))
    p.join("t", "a")
    assert wait_until(lambda: seen == ["a"])
    assert p.stats()["watcher_failures"] == 1
    unwatch()
    p.join("t", "b")
    gevent.sleep(0.05)
    assert seen == ["a"]


def test_close_leaves_everything_and_refuses_joins() -> None:
    p = MemoryPresence()
    seen: list[PresenceEvent] = []
    p.watch("t", seen.append)
    p.join("t", "a")
    p.join("t", "b")
    p.close()
    assert wait_until(lambda: len(seen) == 4)
    assert [e.kind for e in seen[2:]] == [PresenceChange.LEAVE] * 2
    with pytest.raises(PresenceRefused, match="closed"):
        p.join("t", "a")


# -- Hub rooms over real connections -------------------------------------------

class Room:
    """A server whose /?user=X&name=N connections join a Hub with presence."""

    def __init__(self, gserver: Any, presence: MemoryPresence, events: bool = True,
                 **config: Any) -> None:
        self.presence = presence
        self.hub = Hub(HubConfig(presence=presence, presence_events=events, **config),
                       name="lobby")
        self.hub.start()
        self.refused = 0
        self.srv = gserver(websocket_app(self.handler))
        self.url = f"ws://127.0.0.1:{self.srv.address[1]}/"

    def handler(self, ws: Any) -> None:
        q = parse_qs(ws.environ.get("QUERY_STRING", ""))
        user = q.get("user", [None])[0]
        meta = {"name": q["name"][0]} if "name" in q else None
        if not self.hub.register(ws, key=user, meta=meta, presence_events="deaf" not in q):
            self.refused += 1
            ws.close(1008, "presence refused")
            return
        for _ in ws:
            pass

    def stop(self) -> None:
        self.hub.stop()


def presence_messages(client: Any, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with gevent.Timeout(timeout):
        while len(out) < n:
            msg = json.loads(client.recv())
            if msg.get("type") == "presence":
                out.append(msg)
    return out


def test_hub_room_sends_sync_join_and_leave_and_tabs_count_once(gserver: Any) -> None:
    room = Room(gserver, MemoryPresence())
    try:
        alice = connect(room.url + "?user=alice&name=Alice")
        first = presence_messages(alice, 2)
        kinds = {m["event"] for m in first}
        assert kinds == {"sync", "join"}  # its list, and its own join
        bob = connect(room.url + "?user=bob")
        sync = presence_messages(bob, 1)[0]
        if sync["event"] == "join":  # the join may overtake the sync: both are fine
            sync = presence_messages(bob, 1)[0]
        assert sync["event"] == "sync"
        assert {m["member"] for m in sync["members"]} >= {"alice"}
        assert [m for m in sync["members"] if m["member"] == "alice"][0]["meta"] == {"name": "Alice"}
        joined = presence_messages(alice, 1)[0]
        assert (joined["event"], joined["member"], joined["count"]) == ("join", "bob", 2)
        assert room.hub.presence_count() == 2

        # A second tab of alice: one member, two connections, no join message.
        tab2 = connect(room.url + "?user=alice")
        assert wait_until(lambda: room.hub.count == 3)
        assert room.hub.presence_members().members["alice"].connections == 2
        tab2.close()
        assert wait_until(lambda: room.hub.count == 2)
        assert room.hub.presence_count() == 2
        bob.close()
        left = presence_messages(alice, 1)[0]
        assert (left["event"], left["member"], left["count"]) == ("leave", "bob", 1)
        assert left["v"] > joined["v"]
        alice.close()
        assert wait_until(lambda: room.presence.count("lobby") == 0)
    finally:
        room.stop()


def test_hub_without_presence_events_sends_nothing_but_lists(gserver: Any) -> None:
    room = Room(gserver, MemoryPresence(), events=False)
    try:
        a = connect(room.url + "?user=a")
        assert wait_until(lambda: room.hub.presence_count() == 1)
        room.hub.broadcast("hello")
        assert a.recv(timeout=5) == "hello"  # no presence message came first
        a.close()
        assert wait_until(lambda: room.hub.presence_count() == 0)
    finally:
        room.stop()


def test_a_member_registered_without_presence_events_gets_none(gserver: Any) -> None:
    room = Room(gserver, MemoryPresence())
    try:
        deaf = connect(room.url + "?user=deaf&deaf=1")
        assert wait_until(lambda: room.hub.presence_count() == 1)
        hearing = connect(room.url + "?user=hearing")
        got = presence_messages(hearing, 2)
        assert {m["event"] for m in got} == {"sync", "join"}
        room.hub.broadcast("marker")
        assert deaf.recv(timeout=5) == "marker"  # nothing about presence before it
        assert room.hub.presence_count() == 2  # listed all the same
        deaf.close()
        hearing.close()
    finally:
        room.stop()


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_member_that_leaves_without_a_close_frame_leaves_presence(gserver: Any, how: str) -> None:
    room = Room(gserver, MemoryPresence())
    try:
        watcher = connect(room.url + "?user=watcher")
        presence_messages(watcher, 2)
        socks = []
        for i in range(10):
            s, status, _, _ = wsraw.handshake(room.srv.address[1], f"/?user=u{i}")
            assert status == 101
            socks.append(s)
        assert wait_until(lambda: room.hub.presence_count() == 11)
        for s in socks:
            if how == "rst":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            s.close()
        # gstream's WebSocket notices EOF/RST at once (its reader is always reading).
        assert wait_until(lambda: room.hub.presence_count() == 1, timeout=5)
        got = presence_messages(watcher, 20)  # 10 joins, then 10 leaves
        left = [m for m in got if m["event"] == "leave"]
        assert sorted(m["member"] for m in left) == sorted(f"u{i}" for i in range(10))
        assert left[-1]["count"] == 1
    finally:
        room.stop()


def test_hostile_clients_are_refused_by_the_hub_and_counted(gserver: Any) -> None:
    room = Room(gserver, MemoryPresence(PresenceConfig(max_members=5, max_meta_bytes=64)))
    try:
        big = connect(room.url + "?user=big&name=" + "x" * 200)
        with pytest.raises(Closed), gevent.Timeout(5):
            while True:
                big.recv()
        assert big.close_code == 1008
        clients = [connect(room.url + f"?user=m{i}") for i in range(5)]
        assert wait_until(lambda: room.hub.presence_count() == 5)
        extra = connect(room.url + "?user=one-too-many")
        with pytest.raises(Closed), gevent.Timeout(5):
            while True:
                extra.recv()
        assert extra.close_code == 1008
        assert room.hub.stats()["presence_refused"] == 2 and room.refused == 2
        assert room.hub.presence_count() == 5
        for c in clients:
            c.close()
    finally:
        room.stop()


def test_hub_stop_leaves_presence() -> None:
    p = MemoryPresence()
    hub = Hub(HubConfig(presence=p), name="r")
    assert hub.presence_count() == 0
    hub.stop()
    with pytest.raises(RuntimeError):
        Hub(name="x").presence_count()


# -- SSE subscribers (BrokerConfig.presence) -------------------------------------

def _user(environ: dict[str, Any]) -> str | None:
    return parse_qs(environ.get("QUERY_STRING", "")).get("user", [None])[0]


def test_sse_bad_member_or_meta_is_a_400_not_a_retryable_503(gserver: Any) -> None:
    # A refusal caused by the request itself would be refused again on every
    # reconnect: 400 with the reason, while a capacity refusal stays a 503.
    p = MemoryPresence(PresenceConfig(max_members=1, max_meta_bytes=64, max_member_bytes=32))
    broker = SSEBroker(topic="news", presence=p, principal=_user,
                       presence_meta=lambda env: {"q": env.get("QUERY_STRING", "")})
    srv = gserver(broker.subscribe)
    port = srv.address[1]
    url = f"http://127.0.0.1:{port}/"
    big_meta = httpx.get(url, params={"user": "bob", "pad": "x" * 100}, timeout=5)
    assert big_meta.status_code == 400 and "retry-after" not in big_meta.headers
    assert big_meta.text.startswith("presence refused: meta")
    long_id = httpx.get(url, params={"user": "u" * 40}, timeout=5)
    assert long_id.status_code == 400
    assert long_id.text.startswith("presence refused: member id")
    first = SSEStream(port, "/?user=ann")
    assert wait_until(lambda: p.count("news") == 1)
    full = SSEStream(port, "/?user=cid")  # max_members=1: capacity, retry later
    assert full.status == 503 and "retry-after" in full.headers
    full.close()
    first.close()
    assert wait_until(lambda: broker.subscriber_count == 0 and p.count("news") == 0, 5)
    assert broker.stats()["rejected"] == 3


def test_sse_subscribers_join_as_their_principal_and_get_join_leave_events(gserver: Any) -> None:
    p = MemoryPresence(PresenceConfig(max_members=4))
    broker = SSEBroker(topic="news", presence=p, presence_events=True, principal=_user,
                       presence_meta=lambda env: {"ua": env.get("HTTP_USER_AGENT", "")[:20]})
    srv = gserver(broker.subscribe)
    port = srv.address[1]
    events: list[Any] = []
    watcher = SSEClient(f"http://127.0.0.1:{port}/?user=watcher", reconnect=False)

    def read() -> None:
        for ev in watcher:
            events.append((ev.event, json.loads(ev.data)))

    reader = gevent.spawn(read)
    try:
        assert wait_until(lambda: p.count("news") == 1)
        tabs = [SSEStream(port, "/?user=alice"), SSEStream(port, "/?user=alice")]
        anon = SSEStream(port, "/")  # no principal: listed as anon:<its stream key>
        assert wait_until(lambda: p.count("news") == 3)
        assert p.members("news").members["alice"].connections == 2
        assert [m for m in p.members("news").members if m.startswith("anon:")]
        # Only-leave-events subscribers: the broker's event filter applies.
        only_leaves = SSEStream(port, "/?user=filter&event=gstream.leave")
        assert wait_until(lambda: p.count("news") == 4)
        refused = SSEStream(port, "/?user=one-too-many")  # max_members=4
        assert refused.status == 503
        refused.close()
        tabs[0].close()
        gevent.sleep(0.1)
        assert p.count("news") == 4  # alice still has a tab
        tabs[1].sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        tabs[1].close()  # RST, no write due: the departure watch frees it at once
        assert wait_until(lambda: p.count("news") == 3, 5)
        ev = only_leaves.next_event()
        assert ev.event == "gstream.leave" and json.loads(ev.data)["member"] == "alice"
        assert wait_until(lambda: ("gstream.leave", "alice") in
                          [(k, d["member"]) for k, d in events], 5)
        joins = [d["member"] for k, d in events if k == "gstream.join"]
        assert joins.count("alice") == 1 and "filter" in joins
        alice_join = [d for k, d in events if k == "gstream.join" and d["member"] == "alice"][0]
        assert alice_join["meta"] == {"ua": ""} and alice_join["topic"] == "news"
        anon.close()
        only_leaves.close()
        assert wait_until(lambda: p.count("news") == 1, 5)
        broker.close()
        assert wait_until(lambda: p.count("news") == 0, 5)
    finally:
        watcher.close()
        reader.kill()


def test_a_member_at_max_connections_re_registers_with_new_meta(gserver: Any) -> None:
    # A member with the default 32 connections in a room (the cap) renames
    # itself from one of them: re-registering swaps that connection's
    # presence entry, it does not add a 33rd, so it is accepted (an update),
    # and the member still has 32 connections; a 33rd connection is refused.
    p = MemoryPresence()
    cap = p.config.max_connections
    assert cap == 32
    hub = Hub(HubConfig(presence=p), name="lobby")
    hub.start()
    answers: list[bool] = []

    def handler(ws: Any) -> None:
        if not hub.register(ws, key="alice", meta={"name": "A"}):
            ws.close(1008, "presence refused")
            return
        for msg in ws:  # "rename:<name>": register again with a new meta
            if isinstance(msg, str) and msg.startswith("rename:"):
                answers.append(hub.register(ws, key="alice", meta={"name": msg[7:]}))

    srv = gserver(websocket_app(handler))
    url = f"ws://127.0.0.1:{srv.address[1]}/"
    clients = []
    try:
        clients = [connect(url) for _ in range(cap)]
        assert wait_until(lambda: hub.count == cap)
        assert p.members("lobby").members["alice"].connections == cap
        clients[0].send("rename:B")
        assert wait_until(lambda: len(answers) == 1, 5)
        assert answers == [True]
        member = p.members("lobby").members["alice"]
        assert (member.connections, member.meta) == (cap, {"name": "B"})
        extra = connect(url)  # a 33rd connection of alice: refused
        with gevent.Timeout(5), pytest.raises(Closed):
            for _ in range(100):
                extra.recv()
        clients[1].send("rename:C")  # and below the cap, as before
        clients.pop().close()
        assert wait_until(lambda: p.members("lobby").members["alice"].connections == cap - 1)
        assert wait_until(lambda: len(answers) == 2, 5) and answers[1] is True
    finally:
        for c in clients:
            c.close()
        hub.stop()
