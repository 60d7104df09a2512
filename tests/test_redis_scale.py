"""The Redis backplane at scale, with real redis-server processes: a Redis
that stalls instead of failing, batched publishing, publishers that are not
servers, processes that are not monkey-patched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import gevent
import pytest
import requests

import gstream
from gstream import websocket_app
from gstream.backplane.redis import RedisBackplane, RedisHubBackplane
from gstream.broker import SSEBroker
from gstream.client import connect
from gstream.errors import BackplaneUnavailable
from gstream.events import Event
from gstream.handler import GStreamHandler
from gstream.hub import Hub
from tests.helpers import SSEStream, wait_until
from tests.redis_fixture import RedisCluster, RedisServer, SentinelGroup, redis_command

pytestmark = pytest.mark.redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What a stalled Redis may cost local fan-out: nothing at all for a hub
# broadcast and for SSEBroker.publish (both only enqueue); past stall_limit
# a publish is refused at once. BOUND leaves room for a loaded 2-core box
# while staying far below the stall itself.
STALL = 1.5
BOUND = 0.3


def _stall(port: int, how: str, seconds: float = STALL) -> socket.socket:
    """Make Redis stop answering for ``seconds`` (the reply is never awaited)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    cmd = [b"DEBUG", b"SLEEP", str(seconds).encode()] if how == "debug-sleep" \
        else [b"CLIENT", b"PAUSE", str(int(seconds * 1000)).encode(), b"ALL"]
    s.sendall(b"*%d\r\n" % len(cmd) + b"".join(b"$%d\r\n%s\r\n" % (len(c), c) for c in cmd))
    return s


@pytest.mark.parametrize("how", ["debug-sleep", "client-pause"])
def test_a_stalled_redis_does_not_stall_local_fan_out(serve: Any, how: str) -> None:
    # The delivery rule during a stall (docs/redis.md, "Faults"): hub
    # broadcasts reach local members at once; SSEBroker.publish returns at
    # once (accepted, id not known yet) until the writer's round trip has
    # been unanswered for stall_limit, then raises at once (refused,
    # delivered nowhere); once Redis answers, every accepted event reaches
    # the subscribers, this process's too, in order, with its Redis id.
    stall_for, limit = 2.5, 0.5
    srv = RedisServer(extra_args=("--enable-debug-command", "yes"))
    srv.start()
    bp = RedisBackplane(srv.url, block=0.5, backoff=0.02, backoff_cap=0.2, stall_limit=limit)
    far = RedisHubBackplane(srv.url, block=0.5)  # another process's hub
    broker = SSEBroker(topic="s", backplane=bp, heartbeat_interval=None)
    hub = Hub(name="room", backplane=bp.hub_backplane())
    hub.start()
    remote: list[str | bytes] = []
    far.attach("room", lambda p: remote.append(p) or True)
    members: list[gstream.WebSocket] = []

    def on_ws(ws: gstream.WebSocket) -> None:
        hub.register(ws)
        members.append(ws)
        for _ in ws:
            pass

    ws_app = websocket_app(on_ws)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/events":
            return broker.subscribe(environ, start_response)
        return ws_app(environ, start_response)

    running = serve(app, handler_class=GStreamHandler)
    client = connect(f"ws://127.0.0.1:{running.port}/ws")
    sub = SSEStream(running.port, "/events")
    stall: socket.socket | None = None
    try:
        assert wait_until(lambda: len(members) == 1)
        # Warm up: the pub/sub readers subscribe asynchronously.
        with gevent.Timeout(5):
            while not remote:
                hub.broadcast("probe")
                gevent.sleep(0.05)
        gevent.sleep(0.1)
        while True:  # drain the probes
            try:
                client.recv(timeout=0.05)
            except TimeoutError:
                break
        remote.clear()
        warm = broker.publish("warm", wait_for_id=5.0)
        assert warm is not None and sub.next_event().last_event_id == warm

        stall = _stall(srv.port, how, stall_for)
        stalled_at = time.monotonic()
        gevent.sleep(0.1)  # Redis is now sleeping / paused
        t0 = time.monotonic()
        hub.broadcast("hub-during")
        got = client.recv(timeout=5)
        hub_took = time.monotonic() - t0
        assert got == "hub-during"
        assert hub_took < BOUND, f"hub fan-out waited {hub_took:.3f}s for a stalled Redis"
        took: list[float] = []
        accepted: list[str] = []
        refused = ""
        # Publish until refused: accepted first, refused once the writer's
        # round trip has waited stall_limit (well before the stall ends).
        with gevent.Timeout(stall_for - 0.3):
            while not refused:
                t0 = time.monotonic()
                try:
                    assert broker.publish(f"during-{len(accepted)}") is None  # id not known yet
                    accepted.append(f"during-{len(accepted)}")
                except BackplaneUnavailable as exc:
                    refused = str(exc)
                took.append(time.monotonic() - t0)
                gevent.sleep(0.02)
        assert max(took) < BOUND, f"publish waited {max(took):.3f}s for a stalled Redis"
        assert "stalled" in refused and len(accepted) >= 3, (refused, accepted)
        # Refused again, at once; a hub broadcast now is refused towards
        # Redis but still delivered to the local member at once.
        t0 = time.monotonic()
        with pytest.raises(BackplaneUnavailable, match="stalled"):
            broker.publish("refused-2")
        hub.broadcast("hub-late")
        assert client.recv(timeout=5) == "hub-late"
        assert time.monotonic() - t0 < BOUND
        assert time.monotonic() - stalled_at < stall_for  # all that happened during the stall
        assert bp.stats()["outbox_stalled"] >= 2 and hub.stats()["backplane_failures"] >= 1

        # Once Redis answers: everything accepted arrives, in order, with
        # Redis ids; nothing refused ever does (the next event is "after").
        after: str | None = None
        with gevent.Timeout(stall_for + 5):
            while True:
                try:
                    after = broker.publish("after", wait_for_id=5.0)
                    break
                except BackplaneUnavailable:  # still stalled: refused, never delivered
                    gevent.sleep(0.05)
        assert after is not None
        events = sub.events(len(accepted) + 1, timeout=10)
        assert [e.data for e in events] == accepted + ["after"]
        assert events[-1].last_event_id == after
        ids = [tuple(map(int, e.last_event_id.split("-"))) for e in events]
        assert ids == sorted(ids) and ids[0] > tuple(map(int, warm.split("-")))
        hub.broadcast("hub-after")
        assert wait_until(lambda: remote == ["hub-during", "hub-after"], timeout=5), remote
        assert bp.stats()["queued"] == 0 and bp.stats()["outbox_lost"] == 0
    finally:
        if stall is not None:
            stall.close()
        client.close()
        sub.close()
        hub.stop()
        broker.close()
        far.close()
        bp.close()
        srv.stop()


def test_publish_refused_when_the_outbound_queue_is_full() -> None:
    srv = RedisServer(extra_args=("--enable-debug-command", "yes"))
    srv.start()
    bp = RedisBackplane(srv.url, block=0.5, publish_wait=0.01, queue_limit=3, stall_limit=None)
    got: list[str] = []
    bp.attach("q", lambda e, f, may_block=True: got.append(e.data) or 1)
    stall: socket.socket | None = None
    try:
        assert bp.append("q", Event(data="first")) is not None
        stall = _stall(srv.port, "debug-sleep")
        gevent.sleep(0.1)
        accepted = [bp.append("q", Event(data=f"a{i}")) for i in range(4)]
        # One is in flight (the writer's pipeline), three wait: the queue is full.
        assert accepted == [None] * 4
        t0 = time.monotonic()
        with pytest.raises(BackplaneUnavailable, match="outbound queue is full"):
            bp.append("q", Event(data="refused"))
        assert time.monotonic() - t0 < BOUND
        assert bp.stats()["outbox_full"] == 1
        assert wait_until(lambda: len(got) == 5, timeout=STALL + 5)
        assert got == ["first", "a0", "a1", "a2", "a3"]
    finally:
        if stall is not None:
            stall.close()
        bp.close()
        srv.stop()


UNPATCHED_SERVER = r"""
import sys

from gstream.broker import SSEBroker
from gstream.server import serve


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


try:
    from gstream.backplane.redis import RedisBackplane

    feed = SSEBroker(topic="t", backplane=RedisBackplane(sys.argv[1], block=5.0))
    print("backplane started", flush=True)
except RuntimeError as exc:
    print("refused:", exc, flush=True)
serve(app, "127.0.0.1", 0, ready=lambda server: print(server.url, flush=True))
"""


def test_a_server_started_from_python_without_patching_warns_and_never_freezes(
        tmp_path: Any) -> None:
    # The README's "From Python" form without monkey.patch_all(): the server
    # says so, and the Redis backplane refuses to start instead of holding
    # the whole loop in a blocking XREAD (plain requests took 5-10 s).
    srv = RedisServer()
    srv.start()
    errlog = tmp_path / "stderr.log"
    with open(errlog, "w") as err:
        p = subprocess.Popen([sys.executable, "-c", UNPATCHED_SERVER, srv.url], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                             stderr=err, text=True)
    try:
        assert p.stdout is not None
        with gevent.Timeout(20):
            first = p.stdout.readline()
            url = p.stdout.readline().strip()
        assert first.startswith("refused: RedisBackplane needs gevent-patched sockets"), first
        assert "monkey.patch_all()" in first and "Publisher" in first
        assert url.startswith("http://127.0.0.1:"), (url, errlog.read_text())
        for _ in range(3):
            t0 = time.monotonic()
            r = requests.get(url + "/", timeout=10)
            assert r.status_code == 200 and r.text == "ok"
            assert time.monotonic() - t0 < 1.0
            gevent.sleep(0.2)
        log = errlog.read_text()
        assert log.count("the socket module is not patched by gevent") == 1, log
    finally:
        p.kill()
        p.wait(5)
        srv.stop()


PLAIN_PUBLISHER = r"""
import json
import sys

from gevent import monkey

from gstream.backplane.redis import Publisher

assert not monkey.is_module_patched("socket")  # a plain process: no gevent patching
with Publisher(sys.argv[1]) as pub:
    ids = [pub.publish("feed", "one"), pub.publish("feed", "two", event="feed", retry=3000)]
    ids += pub.publish_many("feed", ["three", "four"])
    heard = pub.broadcast("room", "hello from a script")
print(json.dumps({"ids": ids, "heard": heard}), flush=True)
"""


def test_a_plain_process_publishes_to_subscribers_of_a_server_process() -> None:
    from tests.test_redis_backplane import Node

    srv = RedisServer()
    srv.start()
    node = Node(srv.url, 1024)
    try:
        node.wait()
        sub = node.stream()
        member = connect(f"ws://127.0.0.1:{node.port}/ws")
        assert member.recv(timeout=5) == "joined"
        out = subprocess.run([sys.executable, "-c", PLAIN_PUBLISHER, srv.url], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        got = sub.events(4, timeout=10)
        assert [e.data for e in got] == ["one", "two", "three", "four"]
        assert [e.last_event_id for e in got] == result["ids"]
        assert got[1].event == "feed" and got[0].event == "message"
        assert result["heard"] == 1  # the server process's pub/sub link
        assert member.recv(timeout=5) == "hello from a script"
        # And a client resumes from a publisher-returned id like from any other.
        again = node.stream(last_id=result["ids"][1])
        assert [e.data for e in again.events(2, timeout=10)] == ["three", "four"]
        again.close()
        sub.close()
        member.close()
    finally:
        node.stop()
        srv.stop()


def test_sentinel_failover_mid_stream_loses_no_accepted_event() -> None:
    # Two server processes on redis+sentinel://; a publisher keeps publishing
    # on A while the sentinel promotes the replica. Every event A accepted
    # reaches the subscribers of both processes, once, in order, and a client
    # resumes on B (which has no local window) across the failover.
    from tests.test_redis_backplane import Node

    group = SentinelGroup()
    group.start()
    a, b = Node(group.url, 1024), Node(group.url, 0)
    try:
        a.wait()
        b.wait()
        sa, sb = a.stream(), b.stream()
        accepted: list[str] = []
        ids: list[str | None] = []
        refused = 0

        def publish(tag: str) -> None:
            nonlocal refused
            r = requests.post(f"{a.url}/publish", params={"count": 1, "tag": tag}, timeout=10)
            if r.status_code == 200:
                accepted.append(f"{tag}:0")
                ids.append(r.json()["ids"][0])
            else:
                assert r.status_code == 503, r.text
                refused += 1

        for i in range(20):
            publish(f"pre{i}")
        old = group.master_port()
        group.failover()
        switched = 0
        with gevent.Timeout(20):
            i = 0
            while not switched or len(accepted) < switched + 20:
                publish(f"x{i}")
                i += 1
                if not switched and group.master_port() != old:
                    switched = len(accepted)  # published so far went to the old master
                gevent.sleep(0.02)
        assert group.master_port() == group.replica.port and switched >= 20
        for s in (sa, sb):
            got = s.events(len(accepted), timeout=15)
            assert [e.data for e in got] == accepted
        mark = ids[10]
        assert mark is not None
        again = b.stream(last_id=mark)
        assert [e.data for e in again.events(len(accepted) - 11, timeout=10)] == accepted[11:]
        again.close()
        # Refused publishes (503 while no master answered) were never delivered: checked above.
        assert refused <= len(accepted)
        sa.close()
        sb.close()
    finally:
        a.stop()
        b.stop()
        group.stop()


def test_publish_many_pipelines_in_order_with_resumable_ids() -> None:
    srv = RedisServer()
    srv.start()
    # 1,000 events: several pipelines; a long publish_wait so that every id is waited for.
    bp = RedisBackplane(srv.url, block=0.5, batch=100, publish_wait=5.0)
    broker = SSEBroker(topic="m", backplane=bp, history_size=0)
    got: list[tuple[str, str]] = []
    bp.attach("m", lambda e, f, may_block=True: got.append((e.id or "", e.data)) or 1)
    try:
        sent = [f"e{i}" for i in range(1000)]
        ids = broker.publish_many([Event(data=d, name="n") if i % 2 else d
                                   for i, d in enumerate(sent)])
        assert len(ids) == 1000 and None not in ids
        keys = [tuple(map(int, i.split("-"))) for i in ids if i is not None]
        assert keys == sorted(keys) and len(set(keys)) == 1000
        assert bp.stats()["outbox_round_trips"] <= 12  # pipelined, not 1,000 round trips
        assert wait_until(lambda: len(got) == 1000, timeout=10)
        assert got == list(zip(ids, sent, strict=True))
        # Resume from Redis (no local window) from an id publish_many returned.
        status, _headers, body = broker.stream({"REQUEST_METHOD": "GET",
                                                "HTTP_LAST_EVENT_ID": ids[989]})
        assert status.startswith("200")
        first = b"".join(next(iter(body)) for _ in range(1))
        assert f"id: {ids[990]}".encode() in first
        body.close()
        assert broker.publish_many([]) == []
    finally:
        broker.close()
        bp.close()
        srv.stop()


def test_cluster_two_topics_on_different_slots() -> None:
    # A real 3-node Redis Cluster: each topic's stream is hash-tagged onto one
    # slot; two topics on different nodes, two backplanes (two processes), a
    # plain Publisher, a resume from the cluster, and hub broadcasts across.
    from redis.crc import key_slot

    from gstream.backplane.redis import Publisher

    cluster = RedisCluster()
    cluster.start()
    one = RedisBackplane(cluster.url, block=0.5)
    two = RedisBackplane(cluster.url, block=0.5, publish_wait=5.0)  # every id waited for
    feeds = {t: SSEBroker(topic=t, backplane=one, history_size=0) for t in ("alpha", "beta")}
    got: dict[str, list[tuple[str, str]]] = {"alpha": [], "beta": []}
    for t in got:
        one.attach(t, lambda e, f, may_block=True, t=t: got[t].append((e.id or "", e.data)) or 1)
    hub_one, hub_two = one.hub_backplane(), two.hub_backplane()
    heard: list[str | bytes] = []
    hub_one.attach("room", lambda p: heard.append(p) or True)
    hub_two.attach("room", lambda p: True)
    try:
        ports = {t: cluster.port_of_slot(key_slot(f"gstream:sse:{{{t}}}".encode()))
                 for t in got}
        assert ports["alpha"] != ports["beta"]  # two nodes
        sent: dict[str, list[tuple[str | None, str]]] = {"alpha": [], "beta": []}
        for i in range(30):
            t = "alpha" if i % 3 else "beta"
            sent[t].append((two.append(t, Event(data=f"{t}{i}")), f"{t}{i}"))
        ids = two.append_many("alpha", [Event(data="m1"), Event(data="m2")])
        sent["alpha"] += list(zip(ids, ["m1", "m2"], strict=True))
        with Publisher(cluster.url) as pub:
            sent["beta"].append((pub.publish("beta", "from-script"), "from-script"))
        for t in got:
            assert wait_until(lambda t=t: len(got[t]) == len(sent[t]), timeout=10), (t, got)
            assert got[t] == sent[t]
        # Each stream lives on its node, under its hash-tagged key.
        assert b":1" in redis_command(ports["beta"], "EXISTS", "gstream:sse:{beta}")
        # Resume from the cluster (no local window) on the other backplane's broker.
        status, _headers, body = feeds["alpha"].stream(
            {"REQUEST_METHOD": "GET", "HTTP_LAST_EVENT_ID": sent["alpha"][-3][0]})
        assert status.startswith("200")
        first = next(iter(body))
        assert b"data: m1" in first and b"data: m2" in first
        body.close()
        # Hub broadcasts (classic pub/sub reaches every node).
        with gevent.Timeout(5):
            while not heard:
                hub_two.broadcast("room", "hello")
                gevent.sleep(0.05)
        assert heard[0] == "hello"
    finally:
        for b in feeds.values():
            b.close()
        for bp in (hub_one, hub_two):
            bp.close()
        one.close()
        two.close()
        cluster.stop()


def test_events_accepted_during_a_stall_survive_a_crash_of_redis() -> None:
    # Accepted (publish returned None during a stall) means delivered, even if
    # Redis then dies before processing them: the writer keeps them and sends
    # them, in order, when Redis is back; publishes meanwhile are refused.
    srv = RedisServer(extra_args=("--enable-debug-command", "yes"))
    srv.start()
    bp = RedisBackplane(srv.url, block=0.5, backoff=0.02, backoff_cap=0.2)
    got: list[str] = []
    bp.attach("c", lambda e, f, may_block=True: got.append(e.data) or 1)
    stall: socket.socket | None = None
    try:
        assert bp.append("c", Event(data="warm")) is not None
        assert wait_until(lambda: got == ["warm"])
        stall = _stall(srv.port, "debug-sleep")
        gevent.sleep(0.1)
        assert [bp.append("c", Event(data=f"a{i}")) for i in range(3)] == [None] * 3
        srv.kill()  # before Redis processed them
        stall.close()
        also_accepted = 0  # returned (None) before the writer noticed the crash
        with gevent.Timeout(5):
            while True:
                try:
                    bp.append("c", Event(data="b"))
                except BackplaneUnavailable:
                    break
                also_accepted += 1
                gevent.sleep(0.01)
        assert bp.stats()["queued"] == 3 + also_accepted  # kept for the retry
        srv.start()
        want = ["warm", "a0", "a1", "a2"] + ["b"] * also_accepted
        assert wait_until(lambda: len(got) >= len(want), timeout=10), got
        gevent.sleep(0.3)  # and nothing else (the refused one) arrives
        assert got == want
        assert bp.stats()["outbox_lost"] == 0 and bp.stats()["queued"] == 0
    finally:
        if stall is not None:
            stall.close()
        bp.close()
        srv.stop()


def test_sentinels_argument_follows_a_master_crash_with_nothing_accepted_lost() -> None:
    # RedisBackplane(sentinels=[(host, port)], service=...) instead of a URL;
    # the master is killed mid-stream (not a polite SENTINEL FAILOVER): every
    # event publish() accepted (returned without raising) reaches both
    # processes once, in order, and a client resumes on the process that has
    # no local window from an id issued before the crash.
    group = SentinelGroup()
    group.start()
    sentinels = [("127.0.0.1", group.sentinel_port)]
    opts: dict[str, Any] = dict(block=0.5, backoff=0.02, backoff_cap=0.2)
    a = RedisBackplane(sentinels=sentinels, service=group.service, **opts)
    b = RedisBackplane(sentinels=sentinels, service=group.service, **opts)
    assert a.url == f"redis+sentinel://127.0.0.1:{group.sentinel_port}/{group.service}/0"
    feed_a = SSEBroker(topic="f", backplane=a, heartbeat_interval=None)
    feed_b = SSEBroker(topic="f", backplane=b, heartbeat_interval=None, history_size=0)
    got: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    a.attach("f", lambda e, f, may_block=True: got["a"].append((e.id or "", e.data)) or 1)
    b.attach("f", lambda e, f, may_block=True: got["b"].append((e.id or "", e.data)) or 1)
    try:
        accepted: list[str] = []
        refused = 0

        def publish(data: str) -> None:
            nonlocal refused
            try:
                feed_a.publish(data)  # returns once queued: the id is not awaited
                accepted.append(data)
            except BackplaneUnavailable:
                refused += 1  # never delivered: checked below

        for i in range(20):
            publish(f"pre{i}")
        assert wait_until(lambda: len(got["a"]) == len(got["b"]) == 20, timeout=10)
        # The replica has everything (asynchronous replication: an entry it
        # has not got when the master dies is lost with the master, Redis's
        # own limit, docs/redis.md "Sentinel").
        assert redis_command(group.master.port, "WAIT", "1", "5000") == b":1\r\n"
        group.master.kill()
        switched = 0
        with gevent.Timeout(25):
            i = 0
            while not switched or len(accepted) < switched + 20:
                publish(f"x{i}")
                i += 1
                if not switched and group.master_port() == group.replica.port:
                    switched = len(accepted)
                gevent.sleep(0.02)
        assert refused > 0  # publishes during the failover were refused, not queued forever
        for side in ("a", "b"):
            assert wait_until(lambda side=side: len(got[side]) >= len(accepted), timeout=10)
            assert [d for _, d in got[side]] == accepted, side
        assert got["a"] == got["b"]  # same ids everywhere
        ids = [tuple(map(int, i.split("-"))) for i, _ in got["a"]]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        # Resume on B (no local window: served from the new master) from an
        # id the old master issued.
        mark = got["a"][10][0]
        status, _headers, body = feed_b.stream({"REQUEST_METHOD": "GET",
                                                "HTTP_LAST_EVENT_ID": mark})
        assert status.startswith("200")
        first = next(iter(body)).decode()
        body.close()
        assert [line[6:] for line in first.splitlines()
                if line.startswith("data: ")] == accepted[11:]
        assert a.stats()["outbox_lost"] == 0
    finally:
        feed_a.close()
        feed_b.close()
        a.close()
        b.close()
        group.stop()


def test_publish_to_an_unreachable_redis_raises_instead_of_queueing() -> None:
    # publish() does not wait for ids, but while Redis is not known to be up
    # (first publish, or after a failed round trip) it waits for its own
    # round trip (50 ms at most): a Redis that is not there is refused in
    # the caller, nothing is queued behind its back.
    from tests.redis_fixture import free_port

    port = free_port()  # nothing listens there
    bp = RedisBackplane(f"redis://127.0.0.1:{port}/0", block=0.5, backoff=0.02,
                        backoff_cap=0.05)
    broker = SSEBroker(topic="u", backplane=bp, heartbeat_interval=None)
    try:
        refused = 0
        with gevent.Timeout(10):
            for _ in range(20):
                t0 = time.monotonic()
                with pytest.raises(BackplaneUnavailable, match="Redis did not accept"):
                    broker.publish("nowhere")
                assert time.monotonic() - t0 < BOUND
                refused += 1
                gevent.sleep(0.03)  # past the backoff delay now and then: a new probe
        assert refused == 20 and bp.stats()["queued"] == 0
        assert bp.stats()["outbox_lost"] == 0 and bp.stats()["outbox_sent"] == 0
    finally:
        broker.close()
        bp.close()


def test_sentinels_argument_builds_the_sentinel_url_and_rejects_bad_input() -> None:
    # No server needed: the backplane connects lazily.
    bp = RedisBackplane("redis://:pw@ignored:6379/2", sentinels=[("h1", 26379), ("::1", 26380)],
                        service="my svc")
    try:
        assert bp.url == "redis+sentinel://:pw@h1:26379,[::1]:26380/my%20svc/2"
    finally:
        bp.close()
    for kwargs, message in (
            ({"service": "m"}, "pass sentinels= too"),
            ({"sentinels": [("h", 26379)]}, "needs service="),
            ({"sentinels": [], "service": "m"}, "is empty"),
            ({"sentinels": [("h",)], "service": "m"}, "pairs"),
            ({"sentinels": [("h", 0)], "service": "m"}, "not a sentinel address"),
            ({"sentinels": [("h", "x")], "service": "m"}, "pairs")):
        with pytest.raises(ValueError, match=message):
            RedisBackplane(**kwargs)
