"""The Redis backplane with a real redis-server and real server processes.

Two `python -m gstream serve tests.apps.redis_feed:make_app()` processes share
one Redis: A keeps a local replay window, B has none (every resume on B goes
to the Redis stream). Clients are raw-socket SSE readers.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests

from gstream.backplane.redis import RedisBackplane, RedisHubBackplane
from gstream.broker import SSEBroker
from gstream.errors import BackplaneUnavailable
from gstream.events import Event
from tests.helpers import SSEStream, wait_until
from tests.redis_fixture import RedisServer, free_port

pytestmark = pytest.mark.redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = "tests.apps.redis_feed:make_app()"


class Node:
    """One server process of the application."""

    def __init__(self, redis_url: str, history: int, app: str = APP, cwd: str = ROOT) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
                   GSTREAM_REDIS_URL=redis_url, GSTREAM_HISTORY=str(history))
        # Closed in stop(); a file, not a pipe, so a chatty server never blocks.
        self.log = tempfile.NamedTemporaryFile(prefix="gstream-node-", suffix=".log")  # noqa: SIM115
        self.p = subprocess.Popen([sys.executable, "-m", "gstream", "serve", app, "--port", "0"],
                                  cwd=cwd, env=env, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True)
        self.url = ""
        self.port = 0

    def wait(self, timeout: float = 20) -> None:
        assert self.p.stdout is not None
        with gevent.Timeout(timeout):
            line = self.p.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, f"no URL in {line!r}; log: {self.logs()}"
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def publish(self, count: int = 1, tag: str = "", name: str = "feed") -> list[str]:
        r = requests.post(f"{self.url}/publish", params={"count": count, "tag": tag, "name": name},
                          timeout=10)
        assert r.status_code == 200, r.text
        ids: list[str] = r.json()["ids"]
        return ids

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/stats", timeout=5).json()  # type: ignore[no-any-return]

    def stream(self, last_id: str | None = None, query: str = "") -> SSEStream:
        headers = {"Last-Event-ID": last_id} if last_id else None
        s = SSEStream(self.port, "/events" + query, headers=headers)
        assert s.status == 200
        return s

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        self.log.close()


def _key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def nodes(redis_server: RedisServer) -> Iterator[tuple[Node, Node]]:
    a, b = Node(redis_server.url, 1024), Node(redis_server.url, 0)
    try:
        a.wait()
        b.wait()
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_cross_process_delivery_in_one_global_order(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    sa, sb = a.stream(), b.stream()
    try:
        before = a.stats()["backplane"]["read"]
        ids = a.publish(20, tag="x")
        ids += b.publish(5, tag="y")
        assert len(set(ids)) == 25
        assert [_key(i) for i in ids] == sorted(_key(i) for i in ids)  # global order
        for s in (sa, sb):
            got = s.events(25)
            assert [e.last_event_id for e in got] == ids
            assert [e.data for e in got] == [f"x:{i}" for i in range(20)] + [
                f"y:{i}" for i in range(5)]
            assert all(e.event == "feed" for e in got)
        # No second copy in the publishing process: the next event on A's
        # stream is the marker published after, not a duplicate.
        marker = b.publish(1, tag="marker")
        assert sa.next_event().last_event_id == marker[0]
        assert sb.next_event().last_event_id == marker[0]
        # Each process read every entry exactly once.
        assert a.stats()["backplane"]["read"] - before == 26
    finally:
        sa.close()
        sb.close()


def test_resume_on_another_process_gets_exactly_the_missed_events(
        nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    sa = a.stream()
    first = a.publish(3, tag="seen")
    got = sa.events(3)
    assert [e.last_event_id for e in got] == first
    sa.close()
    missed = a.publish(4, tag="missed")
    # B keeps no local window: this is answered from the Redis stream.
    sb = b.stream(last_id=first[-1])
    try:
        replay = sb.events(4)
        assert [e.last_event_id for e in replay] == missed
        assert [e.data for e in replay] == [f"missed:{i}" for i in range(4)]
        live = a.publish(1, tag="live")
        nxt = sb.next_event()
        assert (nxt.last_event_id, nxt.data) == (live[0], "live:0")
    finally:
        sb.close()
    # Back to A (which has a local window) from the id seen on B.
    more = b.publish(2, tag="more")
    sa2 = a.stream(last_id=live[0])
    try:
        assert [e.last_event_id for e in sa2.events(2)] == more
    finally:
        sa2.close()


def test_resume_from_redis_respects_the_event_filter(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    start = a.publish(1, tag="start")[0]
    wanted = []
    for i in range(3):
        a.publish(1, tag=f"skip{i}", name="other")
        wanted += a.publish(1, tag=f"keep{i}", name="feed")
    s = b.stream(last_id=start, query="?event=feed")
    try:
        got = s.events(3)
        assert [e.last_event_id for e in got] == wanted
        assert [e.data for e in got] == [f"keep{i}:0" for i in range(3)]
    finally:
        s.close()


def test_unknown_or_hostile_ids_get_a_reset_to_the_latest_id(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    latest = a.publish(1, tag="z")[0]
    assert wait_until(lambda: b.stats()["broker"]["last_id"] == latest, timeout=5)
    for bad in ("not-an-id", "99999999999999-0", "1-0x"):
        s = b.stream(last_id=bad)
        try:
            ev = s.next_event()
            assert ev.event == "gstream.reset"
            assert ev.last_event_id == latest
            assert json.loads(ev.data)["reason"] == "unknown"
        finally:
            s.close()


def test_redis_restart_loses_no_accepted_event_and_refuses_during_outage(
        nodes: tuple[Node, Node], redis_server: RedisServer) -> None:
    a, b = nodes
    sa, sb = a.stream(), b.stream()
    try:
        accepted = a.publish(30, tag="before")
        redis_server.kill()  # readers may not have read all 30 yet
        r = requests.post(f"{a.url}/publish", params={"count": 1, "tag": "during"}, timeout=10)
        assert r.status_code == 503
        assert "Redis did not accept" in r.json()["error"] and r.json()["ids"] == []
        gevent.sleep(0.5)  # both readers notice the outage and back off
        redis_server.start()
        after: list[str] = []
        with gevent.Timeout(10):
            while not after:
                r = requests.post(f"{b.url}/publish", params={"count": 1, "tag": "after"},
                                  timeout=10)
                if r.status_code == 200:
                    after = r.json()["ids"]
                else:
                    gevent.sleep(0.05)
        # The subscribers stayed connected throughout and miss nothing.
        for s in (sa, sb):
            got = s.events(31, timeout=10)
            assert [e.last_event_id for e in got] == accepted + after
            assert not any(e.data.startswith("during") for e in got)
        assert "Redis unavailable" in a.logs() and "reachable again" in a.logs()
        # State changes are logged, not every retry.
        assert a.logs().count("Redis unavailable") <= 3
    finally:
        sa.close()
        sb.close()


def test_stream_refused_with_503_when_the_history_is_unreachable(
        redis_server: RedisServer) -> None:
    # In-process: a resume that needs Redis while Redis is down must not be
    # answered with a reset (that would skip events): 503, retry later.
    srv = RedisServer()
    srv.start()
    bp = RedisBackplane(srv.url, block=0.5, backoff=0.02, backoff_cap=0.2, publish_wait=5.0)
    broker = SSEBroker(topic="t", backplane=bp, history_size=0)
    try:
        first = bp.append("t", Event(data="a"))
        bp.append("t", Event(data="b"))
        assert wait_until(lambda: bp.stats()["read"] == 2)
        srv.kill()
        status, headers, body = broker.stream({"REQUEST_METHOD": "GET",
                                               "HTTP_LAST_EVENT_ID": first})
        assert status.startswith("503") and dict(headers)["Retry-After"]
        assert broker.subscriber_count == 0
        with pytest.raises(BackplaneUnavailable):
            broker.publish("c")
    finally:
        broker.close()
        bp.close()
        srv.stop()


def test_password_auth_by_url() -> None:
    srv = RedisServer(password="s3cr3t")
    srv.start()
    good = RedisBackplane(srv.url, block=0.5, publish_wait=5.0)
    bad = RedisBackplane(f"redis://:wrong@127.0.0.1:{srv.port}/0", block=0.5)
    try:
        got: list[str] = []
        good.attach("p", lambda e, f, may_block=True: got.append(e.data) or 1)
        event_id = good.append("p", Event(data="hello"))
        assert wait_until(lambda: got == ["hello"])
        assert good.stats()["positions"]["p"] == event_id
        with pytest.raises(BackplaneUnavailable) as info:
            bad.append("p", Event(data="nope"), wait_for_id=5.0)
        assert "Redis did not accept" in str(info.value)
        assert "wrong" not in str(info.value)  # no password in the message
    finally:
        good.close()
        bad.close()
        srv.stop()


def test_hub_broadcasts_reach_other_hubs_once_with_binary_preserved(
        redis_server: RedisServer) -> None:
    # Two links = two processes (each has its own origin id); two hubs share
    # the first link (siblings in one process).
    one = RedisBackplane(redis_server.url, block=0.5)
    two = RedisHubBackplane(redis_server.url, block=0.5)
    h1, h1b = one.hub_backplane(), one.hub_backplane()
    got1: list[str | bytes] = []
    got1b: list[str | bytes] = []
    got2: list[str | bytes] = []
    try:
        h1.attach("room", lambda p: got1.append(p) or True)
        h1b.attach("room", lambda p: got1b.append(p) or True)
        two.attach("room", lambda p: got2.append(p) or True)
        # Readers subscribe asynchronously: probe until both links hear it.
        with gevent.Timeout(5):
            while not (got2 and got1):
                h1.broadcast("room", "probe")
                two.broadcast("room", "probe")
                gevent.sleep(0.05)
        gevent.sleep(0.1)  # let late probes land before counting
        for lst in (got1, got1b, got2):
            lst.clear()
        payloads: list[str | bytes] = ["héllo", b"\x00\xff\x80binary", "", b"", "x" * 70000]
        for p in payloads:
            h1.broadcast("room", p)
        assert got1 == [] and got1b == payloads  # never back to h1; its sibling at once
        two.broadcast("room", b"back")
        assert wait_until(lambda: len(got2) == len(payloads) and len(got1) == 1)
        assert got2 == payloads
        assert [type(p) for p in got2] == [type(p) for p in payloads]
        assert got1 == [b"back"] and got1b == payloads + [b"back"]
        gevent.sleep(0.2)  # and nothing arrives twice
        assert (len(got1), len(got1b), len(got2)) == (1, 6, 5)
        assert one.hub_backplane().stats()["echoes"] >= len(payloads)
        h1b.close()  # a hub stopping detaches only itself
        two.broadcast("room", "after")
        assert wait_until(lambda: got1[-1:] == ["after"])
        assert got1b[-1] == b"back"
    finally:
        for b in (h1, h1b, two):
            b.close()
        one.close()


def test_hub_broadcast_raises_when_redis_is_down() -> None:
    srv = RedisServer()
    srv.start()
    hub = RedisHubBackplane(srv.url, block=0.5, backoff=0.02, backoff_cap=0.2)
    try:
        hub.attach("c", lambda p: True)
        srv.kill()
        # A broadcast never waits for Redis: the first one after the kill is
        # queued and dropped by the writer (counted); once the writer has
        # seen the outage, broadcasts are refused at once.
        with pytest.raises(BackplaneUnavailable, match="Redis did not accept the broadcast"):
            for _ in range(100):
                hub.broadcast("c", "x")
                gevent.sleep(0.01)
        assert hub.stats()["broadcast_failed"] >= 1
    finally:
        hub.close()
        srv.stop()


def test_reader_resumes_from_its_last_id_not_from_now() -> None:
    # Events Redis accepts while this reader is still backing off must be
    # delivered when it reconnects (a reader that re-read from "$" loses them).
    srv = RedisServer()
    srv.start()
    slow = RedisBackplane(srv.url, block=0.5, backoff=1.0, backoff_cap=1.0)
    other = RedisBackplane(srv.url, block=0.5, publish_wait=5.0)
    got: list[str] = []
    try:
        slow.attach("r", lambda e, f, may_block=True: got.append(e.id or "") or 1)
        ids = [other.append("r", Event(data=str(i))) for i in range(3)]
        assert wait_until(lambda: len(got) == 3)
        srv.kill()
        gevent.sleep(0.1)  # the slow reader fails and sleeps >= 0.5 s
        srv.start()
        with gevent.Timeout(5):
            while True:
                try:
                    ids.append(other.append("r", Event(data="while-backing-off")))
                    break
                except BackplaneUnavailable:
                    gevent.sleep(0.02)
        ids += [other.append("r", Event(data=str(i))) for i in range(2)]
        assert len(got) == 3  # still backing off
        assert wait_until(lambda: len(got) == 6, timeout=5)
        assert got == ids
    finally:
        slow.close()
        other.close()
        srv.stop()


def test_scaleout_example_under_gunicorn_with_two_gevent_workers(
        redis_server: RedisServer) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, GSTREAM_REDIS_URL=redis_server.url,
               BIND=f"127.0.0.1:{port}", WORKERS="2", GRACEFUL_TIMEOUT="1")
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:make_app()"],
            cwd=os.path.join(ROOT, "examples", "scaleout"), env=env,
            stdout=log, stderr=subprocess.STDOUT)
        streams: list[SSEStream] = []
        try:
            def up() -> bool:
                try:
                    return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
                except requests.ConnectionError:
                    return False

            def gunicorn_log() -> str:
                log.seek(0)
                return log.read().decode("utf-8", "replace")[-4000:]

            def booted() -> bool:
                return gunicorn_log().count("Booting worker") >= 2

            assert wait_until(booted, timeout=60, interval=0.05)
            assert wait_until(up, timeout=60, interval=0.1)
            # Connections land on either worker (both accept on the shared
            # socket): keep opening until both serve one.
            by_pid: dict[str, SSEStream] = {}
            for _ in range(200):
                s = SSEStream(port, "/events")
                streams.append(s)
                by_pid.setdefault(s.headers["x-worker-pid"], s)
                if len(by_pid) == 2:
                    break
                gevent.sleep(0.02)
            assert len(by_pid) == 2, f"gunicorn did not use two workers: {gunicorn_log()}"
            for i in range(6):  # publishes also land on either worker
                r = requests.post(f"http://127.0.0.1:{port}/publish", data=f"m{i}", timeout=5)
                assert r.status_code == 200, r.text
            seen = []
            for s in by_pid.values():
                try:
                    got = s.events(6, timeout=10)
                except (gevent.Timeout, EOFError) as exc:
                    raise AssertionError(f"{exc!r}; log: {gunicorn_log()}") from None
                assert [json.loads(e.data)["text"] for e in got] == [f"m{i}" for i in range(6)]
                seen.append([e.last_event_id for e in got])
            # Both workers delivered the same stream entries, in the same order.
            assert seen[0] == seen[1] and len(set(seen[0])) == 6
            assert sorted(seen[0], key=_key) == seen[0]
        finally:
            for s in streams:
                s.close()
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_tls_and_password_by_url(tmp_path: Any) -> None:
    from tests.tlsutil import make_cert

    cert, key = make_cert(str(tmp_path))
    port = free_port()
    proc = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert,
         "--tls-auth-clients", "no", "--requirepass", "tlspw", "--save", "",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://:tlspw@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    good = RedisBackplane(url, block=0.5, publish_wait=5.0)
    untrusted = RedisBackplane(f"rediss://:tlspw@127.0.0.1:{port}/0", block=0.5)
    try:
        def ready() -> bool:
            try:
                good.append("warm", Event(data="x"))
                return True
            except BackplaneUnavailable:
                return False

        assert wait_until(ready, timeout=10, interval=0.05)
        got: list[str] = []
        good.attach("tls", lambda e, f, may_block=True: got.append(e.data) or 1)
        good.append("tls", Event(data="secret"))
        assert wait_until(lambda: got == ["secret"])
        with pytest.raises(BackplaneUnavailable, match="certificate verify failed"):
            untrusted.append("tls", Event(data="nope"), wait_for_id=5.0)
    finally:
        good.close()
        untrusted.close()
        proc.kill()
        proc.wait(5)


def test_client_ahead_of_a_lagging_process_is_caught_up_not_reset(serve: Any) -> None:
    # The client saw X on a fast process; this process's reader is behind
    # (reconnecting). The resume waits for the reader instead of answering
    # with a reset and then sending X again.
    srv = RedisServer()
    srv.start()
    fast = RedisBackplane(srv.url, block=0.5, publish_wait=5.0)
    lagging = RedisBackplane(srv.url, block=0.5, backoff=1.0, backoff_cap=1.0,
                             catch_up_timeout=5.0)
    broker = SSEBroker(topic="c", backplane=lagging, heartbeat_interval=None)
    app = serve(broker.subscribe)
    try:
        first = fast.append("c", Event(data="0"))
        assert wait_until(lambda: broker.last_id == first)
        fast._pub.client_kill_filter(_type="normal", skipme=True)  # drops lagging's reader
        gevent.sleep(0.1)  # lagging's reader has failed and sleeps ~0.5-1 s
        seen = fast.append("c", Event(data="1"))
        assert broker.last_id == first  # this process has not delivered it yet
        s = SSEStream(app.port, "/events", headers={"Last-Event-ID": seen})
        try:
            nxt = fast.append("c", Event(data="2"))
            ev = s.next_event(timeout=5)
            assert (ev.event, ev.last_event_id, ev.data) == ("message", nxt, "2")
        finally:
            s.close()
    finally:
        broker.close()
        fast.close()
        lagging.close()
        srv.stop()


def test_demo_chat_and_feed_across_two_gstream_serve_processes(
        redis_server: RedisServer) -> None:
    demo = pytest.importorskip("gstream.demo")
    pytest.importorskip("gstream.hub")
    if "hub_backplane" not in inspect.signature(demo.make_app).parameters:
        pytest.skip("this branch's demo takes no hub backplane")
    from gstream.client import connect

    cwd = os.path.join(ROOT, "examples", "scaleout")
    a, b = (Node(redis_server.url, 1024, app="app:make_app()", cwd=cwd) for _ in range(2))
    clients: list[Any] = []
    try:
        a.wait()
        b.wait()
        a1, a2, b1 = (connect(f"ws://127.0.0.1:{n.port}/chat") for n in (a, a, b))
        clients += [a1, a2, b1]
        # Pub/sub subscriptions are asynchronous: probe until B hears A.
        with gevent.Timeout(10):
            while True:
                a1.send(json.dumps({"text": "probe"}))
                try:
                    if json.loads(b1.recv(timeout=0.2))["text"] == "probe":
                        break
                except TimeoutError:
                    pass
        gevent.sleep(0.3)
        for c in clients:  # drain the probes
            while True:
                try:
                    c.recv(timeout=0.1)
                except TimeoutError:
                    break
        a1.send(json.dumps({"text": "from A", "ref": "r1"}))
        b1.send(json.dumps({"text": "from B", "ref": "r2"}))
        for c in clients:
            got = sorted(json.loads(c.recv(timeout=5))["text"] for _ in range(2))
            assert got == ["from A", "from B"]
            with pytest.raises(TimeoutError):  # exactly once
                c.recv(timeout=0.2)
        # The demo's feed shares the stream too: publish on A, read on B.
        sb = b.stream()
        try:
            r = requests.post(f"{a.url}/publish", data="hello feed", timeout=5)
            assert r.status_code == 200, r.text
            ev = sb.next_event()
            assert json.loads(ev.data)["text"] == "hello feed"
            _key(ev.last_event_id)  # the id is the Redis stream entry's
        finally:
            sb.close()
    finally:
        for c in clients:
            c.close()
        a.stop()
        b.stop()
