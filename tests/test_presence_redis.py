"""Presence across processes (gstream/backplane/redis_presence.py) with a real redis-server:
two `gstream serve` processes of tests/apps/presence_app.py, gstream's WebSocket and SSE
clients, raw sockets for FIN/RST, and a kill -9 of one process (its members leave
presence within the lease bound)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests

from gstream.backplane.redis_presence import RedisPresence
from gstream.client import SSEClient, connect
from gstream.errors import PresenceRefused
from gstream.presence import PresenceChange, PresenceEvent
from tests.helpers import SSEStream, wait_until
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "tests.apps.presence_app:make_app()"
RST = struct.pack("ii", 1, 0)
LEASE = 1.0  # seconds, for the processes of these tests (the default is 10)


class Node:
    """One `gstream serve` process of the presence app."""

    def __init__(self, redis_url: str, prefix: str, lease: float = LEASE) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", GSTREAM_REDIS_URL=redis_url,
                   GSTREAM_PRESENCE_LEASE=str(lease), GSTREAM_PRESENCE_PREFIX=prefix)
        self.log = tempfile.NamedTemporaryFile(prefix="gstream-presence-", suffix=".log")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, "-m", "gstream", "serve", APP, "--port", "0"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log,
                                  text=True)
        assert self.p.stdout is not None
        with gevent.Timeout(20):
            line = self.p.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"no URL in {line!r}; log: {self.logs()}"
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"
        # Events published before its reader subscribed would not reach it.
        assert wait_until(lambda: requests.get(f"{self.url}/ready", timeout=5).ok, 20), \
            self.logs()

    def logs(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def presence(self, topic: str = "room") -> dict[str, Any]:
        r = requests.get(f"{self.url}/presence", params={"topic": topic}, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def count(self, topic: str = "room") -> int:
        return int(self.presence(topic)["count"])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        self.log.close()


def listed(messages: list[dict[str, Any]]) -> set[str]:
    """The member list a client builds from presence messages (docs/presence.md)."""
    members: set[str] = set()
    version = -1
    early: list[dict[str, Any]] = []
    for msg in messages:
        if msg["event"] == "sync":
            members = {m["member"] for m in msg["members"]}
            version = msg["v"]
            pending, early = early, []
        elif version < 0:
            early.append(msg)
            continue
        else:
            pending = [msg]
        for e in pending:
            if e["v"] > version:
                (members.discard if e["event"] == "leave" else members.add)(e["member"])
                version = e["v"]
    return members


class Messages:
    """Collect a WebSocket client's presence messages in a greenlet."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.got: list[dict[str, Any]] = []
        self.g = gevent.spawn(self._run)

    def _run(self) -> None:
        for raw in self.client:
            msg = json.loads(raw)
            if msg.get("type") == "presence":
                self.got.append(msg)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.got if m["event"] == event]

    def stop(self) -> None:
        self.client.close()
        self.g.kill()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def pair(redis_server: RedisServer, request: Any) -> Iterator[tuple[Node, Node]]:
    prefix = "t" + re.sub(r"\W", "", request.node.name)[-20:]
    a = Node(redis_server.url, prefix)
    try:
        b = Node(redis_server.url, prefix)
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_one_member_on_two_processes_counts_once_and_leaves_with_its_last_connection(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    watch = Messages(connect(f"{b.ws}/room?user=watcher"))
    alice_a = connect(f"{a.ws}/room?user=alice")
    bob = connect(f"{a.ws}/room?user=bob")
    alice_b = connect(f"{b.ws}/room?user=alice")
    try:
        # Counts agree on both processes; alice is one member with two connections.
        assert wait_until(lambda: a.count() == 3 and b.count() == 3, 10)
        alice = [m for m in b.presence()["members"] if m["member"] == "alice"][0]
        assert alice["connections"] == 2
        assert wait_until(lambda: {m["member"] for m in watch.of("join")} ==
                          {"watcher", "alice", "bob"}, 10)
        assert len(watch.of("join")) == 3  # alice joined once

        alice_a.close()  # alice still has her tab on B: no leave
        assert wait_until(lambda: [m["member"] for m in b.presence()["members"]
                                   if m["member"] == "alice" and m["connections"] == 1], 10)
        bob.close()
        assert wait_until(lambda: [m["member"] for m in watch.of("leave")] == ["bob"], 10)
        started = time.monotonic()
        alice_b.close()
        assert wait_until(lambda: [m["member"] for m in watch.of("leave")] == ["bob", "alice"], 10)
        took = time.monotonic() - started
        assert watch.of("leave")[-1]["count"] == 1
        assert a.count() == 1 and b.count() == 1
        print(f"leave seen on the other process {took * 1000:.0f} ms after the close")
    finally:
        watch.stop()
        for c in (alice_a, bob, alice_b):
            c.close()


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_sse_subscribers_that_leave_are_gone_from_presence_on_the_other_process(
        pair: tuple[Node, Node], how: str) -> None:
    a, b = pair
    events: list[Any] = []
    watcher = SSEClient(f"{b.url}/events?user=watcher", reconnect=False)

    def read() -> None:
        for ev in watcher:
            if ev.event in ("gstream.join", "gstream.leave"):
                events.append((ev.event, json.loads(ev.data)))

    reader = gevent.spawn(read)
    streams: list[SSEStream] = []
    try:
        assert wait_until(lambda: b.count("feed") == 1, 10)
        streams = [SSEStream(a.port, f"/events?user=s{i}") for i in range(10)]
        assert all(s.status == 200 for s in streams)
        assert wait_until(lambda: b.count("feed") == 11, 10)
        started = time.monotonic()
        for s in streams:
            if how == "rst":
                s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            s.close()
        # No write is due (30 s heartbeat): the departure watch of gstream's
        # server ends the streams at once, and their presence with them.
        assert wait_until(lambda: b.count("feed") == 1, 10)
        took = time.monotonic() - started
        assert wait_until(lambda: len([e for e in events if e[0] == "gstream.leave"]) == 10, 10)
        left = sorted(e[1]["member"] for e in events if e[0] == "gstream.leave")
        assert left == sorted(f"s{i}" for i in range(10))
        print(f"{how}: 10 SSE subscribers gone from presence on the other process in "
              f"{took * 1000:.0f} ms")
    finally:
        watcher.close()
        reader.kill()
        for s in streams:
            s.close()


def test_multi_topic_streams_join_each_topic_and_leave_at_rst_on_the_other_process(
        pair: tuple[Node, Node]) -> None:
    a, b = pair
    events: list[Any] = []
    watcher = SSEClient(f"{b.url}/events?user=watcher&topic=chat/1", reconnect=False)

    def read() -> None:
        for ev in watcher:
            if ev.event.startswith("chat/1#gstream."):
                events.append((ev.event, json.loads(ev.data)))

    reader = gevent.spawn(read)
    streams: list[SSEStream] = []
    try:
        assert wait_until(lambda: b.count("chat/1") == 1, 10)
        streams = [SSEStream(a.port, f"/events?user=s{i}&topic=chat/1&topic=chat/2&topic=feed")
                   for i in range(5)]
        assert all(s.status == 200 for s in streams)
        assert wait_until(lambda: (b.count("chat/1"), b.count("chat/2"), b.count("feed"))
                          == (6, 5, 5), 10)
        assert wait_until(lambda: len([e for e in events
                                       if e[0] == "chat/1#gstream.join"]) == 6, 10)
        for s in streams:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            s.close()
        # 30 s heartbeat: the detached streams' read watchers notice the RST at once.
        assert wait_until(lambda: (b.count("chat/1"), b.count("chat/2"), b.count("feed"))
                          == (1, 0, 0), 10)
        assert wait_until(lambda: len([e for e in events
                                       if e[0] == "chat/1#gstream.leave"]) == 5, 10)
        left = sorted(e[1]["member"] for e in events if e[0] == "chat/1#gstream.leave")
        assert left == sorted(f"s{i}" for i in range(5))
        assert all(e[1]["topic"] == "chat/1" for e in events)
    finally:
        watcher.close()
        reader.kill()
        for s in streams:
            s.close()


def test_kill_9_of_one_process_its_members_leave_within_the_lease_bound(
        redis_server: RedisServer) -> None:
    a = Node(redis_server.url, "kill9")
    b = Node(redis_server.url, "kill9")
    watch = None
    clients: list[Any] = []
    streams: list[SSEStream] = []
    try:
        watch = Messages(connect(f"{b.ws}/room?user=watcher"))
        clients = [connect(f"{a.ws}/room?user=m{i}") for i in range(5)]
        clients.append(connect(f"{a.ws}/room?user=watcher"))  # a second tab, on the doomed one
        streams = [SSEStream(a.port, f"/events?user=s{i}") for i in range(3)]
        assert wait_until(lambda: b.count("room") == 6 and b.count("feed") == 3, 10)
        assert wait_until(lambda: len(watch.of("join")) == 6, 10)
        a.p.send_signal(signal.SIGKILL)
        a.p.wait(5)
        killed = time.monotonic()
        assert wait_until(lambda: b.count("room") == 1 and b.count("feed") == 0, 15)
        took = time.monotonic() - killed
        assert wait_until(lambda: len(watch.of("leave")) == 5, 10)
        assert sorted(m["member"] for m in watch.of("leave")) == [f"m{i}" for i in range(5)]
        # The watcher's own connection on B keeps it present.
        assert [m["member"] for m in b.presence("room")["members"]] == ["watcher"]
        bound = LEASE * 1.25
        print(f"kill -9: members gone from presence {took:.2f} s after the kill "
              f"(bound: lease {LEASE} s x 1.25 = {bound:.2f} s after the last refresh)")
        assert took < bound + 5.0  # a generous margin for a loaded machine
    finally:
        if watch is not None:
            watch.stop()
        for c in clients:
            c.abort()
        for s in streams:
            s.close()
        a.stop()
        b.stop()


# -- one process's view, in this test process --------------------------------------

def test_bounds_hold_across_processes_and_hostile_meta_is_refused(
        redis_server: RedisServer) -> None:
    p1 = RedisPresence(redis_server.url, prefix="bounds", max_members=3, max_connections=2,
                       max_meta_bytes=64)
    p2 = RedisPresence(redis_server.url, prefix="bounds", max_members=3, max_connections=2)
    try:
        with pytest.raises(PresenceRefused, match="meta"):
            p1.join("t", "m", {"x": "y" * 100})
        with pytest.raises(PresenceRefused, match="member id"):
            p1.join("t", "x" * 300)
        for bad in ("\ud800", "a\udfffb"):  # would poison the writer's pipeline
            with pytest.raises(PresenceRefused, match="member id"):
                p1.join("t", bad)
            with pytest.raises(PresenceRefused, match="meta"):
                p1.join("t", "m", {"name": bad})
            with pytest.raises(PresenceRefused, match="topic"):
                p1.join(bad, "m")
        p1.join("t", "a")
        p1.join("t", "b")
        assert wait_until(lambda: p1.count("t") == 2, 5)
        p2.join("t", "c")
        assert wait_until(lambda: p2.count("t") == 3, 5)
        p2.join("t", "d")  # a fourth member: over max_members, across processes
        p1.join("t", "a")
        p2.join("t", "a")  # a third connection of a: over max_connections
        assert wait_until(lambda: p1.stats()["refused"] + p2.stats()["refused"] == 2, 5)
        snap = p1.members("t")
        assert set(snap.members) == {"a", "b", "c"} and snap.members["a"].connections == 2
    finally:
        p1.close()
        p2.close()
    assert RedisPresence(redis_server.url, prefix="bounds").count("t") == 0


def test_a_redis_outage_blocks_nothing_and_presence_converges_after() -> None:
    srv = RedisServer()
    srv.start()
    p = RedisPresence(srv.url, prefix="outage", lease=LEASE, backoff_cap=0.2)
    q = None
    seen: list[PresenceEvent] = []
    try:
        keep = p.join("t", "keep")
        gone = p.join("t", "gone")
        assert wait_until(lambda: p.count("t") == 2, 5)
        srv.kill()
        with gevent.Timeout(1):  # joins and leaves never wait for Redis
            p.leave(gone)
            p.join("t", "new")
            p.leave(keep)
            p.join("t", "keep")
        srv.start()  # same port, same data (append-only file)
        assert wait_until(lambda: _members(p) == {"keep", "new"}, 15)
        q = RedisPresence(srv.url, prefix="outage", lease=LEASE)
        q.watch("t", seen.append)
        q.join("t", "other", {"name": "O"})
        q.join("t", "other", {"name": "Renamed"})  # a second connection, another meta
        assert wait_until(lambda: [(e.kind, e.member) for e in seen] ==
                          [(PresenceChange.JOIN, "other"), (PresenceChange.UPDATE, "other")], 10)
        assert seen[1].meta == {"name": "Renamed"} and seen[1].version > seen[0].version
        assert q.count("t") == 3
        assert q.members("t").members["other"].connections == 2
    finally:
        p.close()
        if q is not None:
            q.close()
        srv.stop()


def _members(p: RedisPresence) -> set[str]:
    try:
        return set(p.members("t").members)
    except Exception:
        return set()


def test_a_stalled_redis_never_stalls_the_room(gserver: Any) -> None:
    """SIGSTOP the Redis: members still join the room, broadcasts still arrive; once
    Redis answers again the presence catches up with the room."""
    from gstream import websocket_app
    from gstream.hub import Hub, HubConfig

    srv = RedisServer()
    srv.start()
    p = RedisPresence(srv.url, prefix="stall", lease=LEASE, socket_timeout=0.5, backoff_cap=0.2)
    hub = Hub(HubConfig(presence=p, presence_events=True), name="room")
    hub.start()

    def member(ws: Any) -> None:
        user = ws.environ.get("QUERY_STRING", "").partition("=")[2]
        hub.register(ws, key=user)
        for _ in ws:
            pass

    port = gserver(websocket_app(member)).address[1]
    clients: list[Any] = []
    try:
        clients.append(connect(f"ws://127.0.0.1:{port}/?user=before"))
        assert wait_until(lambda: p.count("room") == 1, 5)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            clients += [connect(f"ws://127.0.0.1:{port}/?user=u{i}") for i in range(3)]
            assert wait_until(lambda: hub.count == 4, 5)
            hub.broadcast("while redis is stopped")
            for c in clients:
                with gevent.Timeout(5):
                    while c.recv() != "while redis is stopped":
                        pass  # presence messages that came first
        finally:
            srv.proc.send_signal(signal.SIGCONT)
        assert wait_until(lambda: _room(p) == {"before", "u0", "u1", "u2"}, 15)
    finally:
        for c in clients:
            c.close()
        hub.stop()
        p.close()
        srv.stop()


def _room(p: RedisPresence) -> set[str]:
    try:
        return set(p.members("room").members)
    except Exception:
        return set()


def test_after_a_redis_restart_listening_members_get_a_fresh_list(gserver: Any) -> None:
    """Pub/sub misses the events of an outage: when the reader is subscribed again,
    the hub sends every listening member a new sync."""
    from gstream import websocket_app
    from gstream.hub import Hub, HubConfig

    srv = RedisServer()
    srv.start()
    p = RedisPresence(srv.url, prefix="resync", lease=LEASE, backoff_cap=0.2)
    other = None
    hub = Hub(HubConfig(presence=p, presence_events=True), name="room")
    hub.start()

    def member(ws: Any) -> None:
        hub.register(ws, key=ws.environ.get("QUERY_STRING", "").partition("=")[2])
        for _ in ws:
            pass

    port = gserver(websocket_app(member)).address[1]
    watch = Messages(connect(f"ws://127.0.0.1:{port}/?user=watcher"))
    try:
        assert p.wait_ready(5)
        assert wait_until(lambda: len(watch.of("sync")) == 1 and len(watch.of("join")) == 1, 5)
        srv.kill()
        srv.start()  # same port and data
        other = RedisPresence(srv.url, prefix="resync", lease=LEASE)
        other.join("room", "elsewhere")  # its join event may be missed; the sync is not
        assert wait_until(lambda: len(watch.of("sync")) == 2, 15), watch.got
        assert wait_until(lambda: listed(watch.got) == {"watcher", "elsewhere"}, 10), watch.got
    finally:
        watch.stop()
        hub.stop()
        p.close()
        if other is not None:
            other.close()
        srv.stop()


def test_a_presence_refused_topic_releases_its_redis_stream(
        redis_server: RedisServer, gserver: Any) -> None:
    # Durable backplane: a refused topic's Redis stream is attached while the
    # request is checked, and must be detached with the refusal (not leak).
    from gstream.backplane.redis import RedisBackplane
    from gstream.broker import SSEBroker
    from gstream.presence import MemoryPresence, PresenceConfig

    backplane = RedisBackplane(redis_server.url, prefix="prt", block=0.5, publish_wait=5.0)
    p = MemoryPresence(PresenceConfig(max_members=1))
    broker = SSEBroker(topic="default", backplane=backplane, presence=p,
                       heartbeat_interval=None, history_size=0,
                       principal=lambda env: env.get("HTTP_X_USER"))
    port = gserver(broker.subscribe).address[1]
    try:
        first = SSEStream(port, "/?topic=full", {"X-User": "u1"})
        assert first.status == 200
        second = SSEStream(port, "/?topic=full&topic=free", {"X-User": "u2"})
        assert second.status == 200
        assert json.loads(second.next_event().data) == {"topics": ["full"],
                                                         "presence_refused": ["full"]}
        assert set(backplane.stats()["positions"]) >= {"full", "free"}
        assert p.count("full") == 1 and p.count("free") == 1
        broker.publish("f1", topic="full")
        broker.publish("x1", topic="free")
        assert second.next_event(10).data == "x1"  # not f1: the refused topic is not served
        assert first.next_event(10).data == "f1"
        first.close()
        # u1 was the only stream of "full": its Redis stream is detached (u2's
        # refused hold was released at once), "free" stays attached for u2.
        assert wait_until(lambda: "full" not in backplane.stats()["positions"], 10)
        assert "free" in backplane.stats()["positions"]
        second.close()
        assert wait_until(lambda: p.connections == 0, 10)
        assert wait_until(lambda: "free" not in backplane.stats()["positions"], 10)
    finally:
        broker.close()
        backplane.close()


def test_a_stream_that_rsts_while_its_join_waits_for_redis_is_never_listed(gserver: Any) -> None:
    """A multi-topic stream joins presence and vanishes by RST while Redis is
    stopped (its join not written yet): the subscribe and the departure wait
    for nothing, and once Redis is back the member is listed nowhere, while a
    member that stayed is listed (seen from another process's RedisPresence)."""
    from gstream.broker import SSEBroker

    srv = RedisServer()
    srv.start()
    p = RedisPresence(srv.url, prefix="rst", lease=LEASE, socket_timeout=0.5, backoff_cap=0.2)
    other = RedisPresence(srv.url, prefix="rst", lease=LEASE)
    broker = SSEBroker(topic="news", presence=p, heartbeat_interval=None,
                       principal=lambda env: env.get("QUERY_STRING", "").partition("user=")[2]
                       .partition("&")[0] or None)
    port = gserver(broker.subscribe).address[1]
    try:
        assert p.wait_ready(10) and other.wait_ready(10)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            gone = SSEStream(port, "/?topic=room/1&topic=room/2&user=gone")
            stays = SSEStream(port, "/?topic=room/1&user=stays")
            assert gone.status == 200 and stays.status == 200
            assert time.monotonic() - t0 < 3  # served without waiting for Redis
            assert wait_until(lambda: p.connections == 3, 5)
            gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
            gone.close()
            assert wait_until(lambda: p.connections == 1, 5)  # left locally at once
        finally:
            srv.proc.send_signal(signal.SIGCONT)

        def listed() -> tuple[set[str], set[str]]:
            try:
                return set(other.members("room/1").members), set(other.members("room/2").members)
            except Exception:
                return set(), {"?"}

        assert wait_until(lambda: listed() == ({"stays"}, set()), 15), listed()
        stays.close()
        assert wait_until(lambda: listed() == (set(), set()), 15), listed()
    finally:
        broker.close()
        other.close()
        p.close()
        srv.stop()
