"""Hub over real loopback servers and real clients (gstream's own client,
the ``websockets`` sync client, raw sockets): fan-out order and frame types,
exclude/where, membership, stop, channel-full drops, threads, several hubs,
the backplane seam, storms and leaks, and the seed's hub_test items."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import parse_qs

import gevent
import pytest
from gevent.monkey import get_original
from websockets.sync.client import connect as ws_connect

import gstream
import gstream.hub as hubmod
from gstream import Closed, WSConfig, websocket_app
from gstream.client import connect
from gstream.handler import GStreamHandler
from gstream.hub import Hub, HubConfig, MemoryBackplane
from tests import wsraw
from tests.helpers import wait_until
from tests.leakcheck import LeakCheck


class Room:
    """A server whose /?user=X&hubs=a,b connections join the named hubs.

    A member that sends ``say:<text>`` broadcasts ``<text>`` to everyone else
    of its first hub (``exclude`` = the sender).
    """

    def __init__(self, serve: Any, hubs: dict[str, Hub] | None = None,
                 config: WSConfig | None = None, handler_class: Any = GStreamHandler) -> None:
        self.hubs = hubs if hubs is not None else {"a": Hub(name="a")}
        for hub in self.hubs.values():
            hub.start()
        self.conns: list[gstream.WebSocket] = []
        self.srv = serve(websocket_app(self.handler, config), handler_class=handler_class)
        self.url = f"ws://127.0.0.1:{self.srv.port}/"

    def handler(self, ws: gstream.WebSocket) -> None:
        q = parse_qs(ws.environ.get("QUERY_STRING", ""))
        names = q.get("hubs", ["a"])[0].split(",")
        user = q.get("user", [None])[0]
        for name in names:
            self.hubs[name].register(ws, key=user)
        self.conns.append(ws)
        for msg in ws:
            if isinstance(msg, str) and msg.startswith("say:"):
                self.hubs[names[0]].broadcast(msg[4:], exclude=ws)

    @property
    def hub(self) -> Hub:
        return next(iter(self.hubs.values()))

    def join(self, n: int, query: str = "", **kw: Any) -> list[Any]:
        """n gstream clients, waiting until all are registered."""
        before = len(self.conns)
        clients = [connect(self.url + ("?" + query if query else ""), **kw) for _ in range(n)]
        assert wait_until(lambda: len(self.conns) >= before + n, 5)
        return clients

    def stop(self) -> None:
        for hub in self.hubs.values():
            hub.stop()


def recv_n(client: Any, n: int, timeout: float = 5.0) -> list[Any]:
    with gevent.Timeout(timeout):
        return [client.recv() for _ in range(n)]


# -- fan-out -------------------------------------------------------------------

@pytest.mark.parametrize("handler_class", [GStreamHandler, None], ids=["gstream", "pywsgi"])
def test_all_members_get_every_message_in_order_text_and_binary(serve: Any, handler_class: Any) -> None:
    kw = {"handler_class": handler_class} if handler_class else {}
    room = Room(serve, **kw)
    clients = room.join(4)
    with ws_connect(room.url, max_size=None) as other:  # an independent client implementation
        assert wait_until(lambda: room.hub.count == 5, 5)
        msgs: list[str | bytes] = [f"m{i}" if i % 2 else f"b{i}".encode() for i in range(300)]
        for m in msgs:
            assert room.hub.broadcast_wait(m, timeout=5)
        for c in clients:
            assert recv_n(c, 300) == msgs  # str arrives as text, bytes as binary
        with gevent.Timeout(5):
            assert [other.recv() for _ in range(300)] == msgs
    st = room.hub.stats()
    assert (st["broadcasts"], st["fanned_out"], st["deliveries"], st["drops"], st["member_drops"]) == (
        300, 300, 1500, 0, 0)
    for c in clients:
        c.close()
    room.stop()


def test_encode_once_for_plain_members_and_deflate_members_encode_their_own(
        serve: Any, monkeypatch: Any) -> None:
    prepared: list[Any] = []
    real = hubmod.prepare

    def counting(message: Any) -> Any:
        pm = real(message)
        prepared.append(pm)
        return pm

    monkeypatch.setattr(hubmod, "prepare", counting)
    room = Room(serve, config=WSConfig(compression=True))
    plain = room.join(3)
    deflate = room.join(2, compression="deflate")
    shares = sorted(ws.shares_frames for ws in room.conns)
    assert shares == [False, False, True, True, True]
    payload = "héllo " * 200
    for i in range(20):
        assert room.hub.broadcast_wait(f"{i}:{payload}", timeout=5)
    for c in plain + deflate:
        assert recv_n(c, 20) == [f"{i}:{payload}" for i in range(20)]
    assert len(prepared) == 20  # one frame per broadcast, whatever the member count
    # Plain members were sent fewer bytes than the deflate ones were not: the
    # compressed members really used their own encoder.
    assert all(c.bytes_received < sum(len(pm.frame) for pm in prepared) for c in deflate)
    for c in plain + deflate:
        c.close()
    room.stop()


def test_exclude_sender_and_where_on_connection_or_key(serve: Any) -> None:
    room = Room(serve)
    alice = room.join(1, "user=alice")[0]
    bob = room.join(1, "user=bob")[0]
    carol = room.join(1, "user=carol")[0]
    by_user = {room.hub.key_of(ws): ws for ws in room.conns}
    assert set(by_user) == {"alice", "bob", "carol"}

    alice.send("say:hi from alice")  # the server broadcasts with exclude=alice
    assert bob.recv(timeout=5) == carol.recv(timeout=5) == "hi from alice"
    assert room.hub.broadcast("to bob", where=lambda ws, key: key == "bob")
    assert room.hub.broadcast("not carol", where=lambda ws: "carol" not in ws.environ["QUERY_STRING"])
    assert room.hub.broadcast("nobody", exclude=list(by_user.values()))
    assert room.hub.broadcast("all")
    assert alice.recv(timeout=5) == "not carol"
    assert alice.recv(timeout=5) == "all"
    assert bob.recv(timeout=5) == "to bob"
    assert bob.recv(timeout=5) == "not carol"
    assert bob.recv(timeout=5) == "all"
    assert carol.recv(timeout=5) == "all"
    for c in (alice, bob, carol):
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.1)
        c.close()
    room.stop()


def test_a_raising_where_skips_members_and_the_hub_keeps_going(serve: Any, caplog: Any) -> None:
    room = Room(serve)
    (c,) = room.join(1)

    def boom(ws: Any) -> bool:
        raise ValueError("bad predicate")

    assert room.hub.broadcast("x", where=boom)
    assert room.hub.broadcast("y")
    assert c.recv(timeout=5) == "y"
    assert "where predicate failed" in caplog.text
    with pytest.raises(TypeError):
        room.hub.broadcast(123)  # type: ignore[arg-type]
    c.close()
    room.stop()


# -- membership ----------------------------------------------------------------

def test_register_unregister_count_and_auto_unregister_on_close(serve: Any) -> None:
    room = Room(serve)
    hub = room.hub
    c1, c2 = room.join(2)
    ws1, ws2 = room.conns
    assert hub.count == 2 and len(hub) == 2 and set(hub.members) == {ws1, ws2}
    assert hub.register(ws1, key="again") and hub.count == 2  # duplicate: key updated only
    assert hub.key_of(ws1) == "again"
    hub.unregister(ws1)
    assert hub.count == 1 and ws1.open  # unregister does not close
    hub.unregister(ws1)  # absent: no-op
    assert hub.broadcast_wait("only c2", timeout=5)
    assert c2.recv(timeout=5) == "only c2"
    with pytest.raises(TimeoutError):
        c1.recv(timeout=0.1)
    c2.close()  # closing a member unregisters it (seed: within 100 ms)
    assert wait_until(lambda: hub.count == 0, 1)
    assert not hub.register(ws2)  # closed: refused
    c1.close()
    assert wait_until(lambda: ws1.wait_closed(0), 3)
    assert not hub.register(ws1)
    room.stop()


def test_max_members(serve: Any) -> None:
    room = Room(serve, hubs={"a": Hub(max_members=2)})
    clients = room.join(3)
    assert room.hub.count == 2 and room.hub.stats()["rejected"] == 1
    for c in clients:
        c.close()
    room.stop()


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        HubConfig(slow_policy="block")
    with pytest.raises(ValueError):
        HubConfig(close_code=1000)
    with pytest.raises(ValueError):
        HubConfig(broadcast_buffer=0)
    assert Hub(HubConfig(), close_code=1008).config.close_code == 1008


# -- stop ----------------------------------------------------------------------

@pytest.mark.parametrize("started", [True, False])
def test_stop_closes_everyone_with_1001_and_later_calls_are_noops(serve: Any, started: bool) -> None:
    hub = Hub()
    room = Room(serve, hubs={"a": hub}) if started else None
    if room is None:
        srv = serve(websocket_app(lambda ws: (hub.register(ws), ws.wait_closed(10))),
                    handler_class=GStreamHandler)
        url = f"ws://127.0.0.1:{srv.port}/"
        clients = [connect(url) for _ in range(3)]
        assert wait_until(lambda: hub.count == 3, 5)
    else:
        clients = room.join(3)
        url = room.url
    members = hub.members
    t0 = time.monotonic()
    assert hub.stop(timeout=3) is True  # waits for the closing handshakes
    assert time.monotonic() - t0 < 2
    assert hub.count == 0 and hub.stopped and not hub.running
    for c in clients:
        with pytest.raises(Closed):
            c.recv(timeout=3)
        assert c.close_code == 1001
    assert all(ws.close_code == 1001 for ws in members)
    late = connect(url)
    assert wait_until(lambda: len(gstream.websocket.open_connections()) >= 1, 3)
    ws_late = [ws for ws in gstream.websocket.open_connections() if ws not in members]
    assert ws_late and not hub.register(ws_late[0]) and hub.count == 0
    assert hub.broadcast("late") is False and hub.broadcast_wait("late", timeout=1) is False
    hub.unregister(ws_late[0])
    assert hub.stop() is True  # a second stop is harmless
    hub.run()  # returns at once after stop
    late.close()


def test_stop_discards_queued_broadcasts_and_wakes_waiters() -> None:
    hub = Hub(broadcast_buffer=1)  # never run: nothing drains the channel
    assert hub.broadcast("a")
    waiter = gevent.spawn(hub.broadcast_wait, "b")
    gevent.sleep(0.05)
    assert not waiter.ready()
    hub.stop()
    assert waiter.get(timeout=1) is False
    assert hub.stats()["discarded"] == 1


def test_stop_returns_fast_with_100_members_and_one_that_never_reads(serve: Any) -> None:
    # Seed: Stop returns within 500 ms even if one of 100 connections' close blocks.
    hub = Hub()
    hub.start()
    srv = serve(websocket_app(lambda ws: (hub.register(ws), ws.wait_closed(10))),
                handler_class=GStreamHandler)
    socks = []
    for _ in range(99):
        s, status, _, _ = wsraw.handshake(srv.port)
        assert status == 101
        socks.append(s)
    stalled, _, _, _ = wsraw.handshake(srv.port)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert wait_until(lambda: hub.count == 100, 5)
    t0 = time.monotonic()
    hub.stop()
    assert time.monotonic() - t0 < 0.5
    for s in socks[:5]:
        assert wsraw.Reader(s).until_close()[0] == 1001
    for s in socks + [stalled]:
        s.close()


def test_register_racing_stop_never_deadlocks(serve: Any) -> None:
    room = Room(serve, hubs={"a": Hub()})
    room.join(1)
    ws = room.conns[0]
    for _ in range(20):
        hub = Hub()
        hub.start()
        with gevent.Timeout(0.5):
            gs = [gevent.spawn(hub.register, ws) for _ in range(5)] + [gevent.spawn(hub.stop)]
            gevent.joinall(gs, raise_error=True)
        assert hub.count == 0
    room.stop()


# -- the broadcast channel -------------------------------------------------------

def test_channel_full_drop_is_counted_and_broadcast_never_blocks(serve: Any) -> None:
    hub = Hub(broadcast_buffer=4)
    room = Room(serve, hubs={"a": hub})
    (c,) = room.join(1)
    empty = Hub()
    t0 = time.monotonic()
    assert all(empty.broadcast("x") for _ in range(4))  # empty hub: no members, no block
    assert time.monotonic() - t0 < 0.1
    # Queue faster than the hub greenlet can run (no yield in between).
    results = [hub.broadcast(f"m{i}") for i in range(10)]
    assert results == [True] * 4 + [False] * 6
    assert hub.stats()["drops"] == 6
    assert recv_n(c, 4) == ["m0", "m1", "m2", "m3"]
    c.close()
    room.stop()
    empty.stop()


def test_broadcast_wait_waits_for_room_with_a_timeout() -> None:
    hub = Hub(broadcast_buffer=1)
    assert hub.broadcast("a")
    t0 = time.monotonic()
    assert hub.broadcast_wait("b", timeout=0.2) is False
    assert 0.15 < time.monotonic() - t0 < 1
    waiter = gevent.spawn(hub.broadcast_wait, "c", timeout=5)
    gevent.sleep(0.05)
    hub.start()  # draining makes room
    assert waiter.get(timeout=2) is True
    assert wait_until(lambda: hub.stats()["fanned_out"] == 2, 2)
    assert hub.stats()["drops"] == 0  # waiting is not dropping
    hub.stop()


def test_concurrent_register_and_broadcast(serve: Any) -> None:
    room = Room(serve)
    clients = room.join(10)
    hub2 = Hub()
    hub2.start()

    def op(ws: gstream.WebSocket, i: int) -> None:
        hub2.register(ws)
        hub2.broadcast_wait(f"c{i}", timeout=2)

    with gevent.Timeout(2):
        gevent.joinall([gevent.spawn(op, ws, i) for i, ws in enumerate(room.conns)], raise_error=True)
    assert hub2.count == 10
    for c in clients:
        c.close()
    room.stop()
    hub2.stop()


# -- native threads ----------------------------------------------------------------

def test_broadcast_register_and_stop_from_native_threads(serve: Any) -> None:
    from gevent.threadpool import ThreadPool

    room = Room(serve)
    hub = room.hub
    (c,) = room.join(1)
    start_new_thread = get_original("_thread", "start_new_thread")
    get_ident = get_original("_thread", "get_ident")
    sleep = get_original("time", "sleep")
    done: list[Any] = []

    def worker() -> None:
        done.append(get_ident())
        t0 = time.perf_counter()
        for i in range(300):
            assert hub.broadcast(f"t{i}")
            if i % 50 == 0:
                sleep(0.001)
        done.append(time.perf_counter() - t0)
        done.append(hub.broadcast_wait("waited", timeout=5))

    start_new_thread(worker, ())
    got = recv_n(c, 301, timeout=10)
    assert got == [f"t{i}" for i in range(300)] + ["waited"]
    assert done[0] != get_ident() and done[1] < 1.0 and done[2] is True
    pool = ThreadPool(2)
    try:
        room.join(1)
        ws = room.conns[-1]
        hub2 = Hub()
        assert pool.spawn(hub2.register, ws, key="k").get(timeout=5) is True
        assert hub2.count == 1 and hub2.key_of(ws) == "k"
        pool.spawn(hub2.unregister, ws).get(timeout=5)
        assert hub2.count == 0
        assert pool.spawn(hub.stop, 2).get(timeout=10) is True
        assert hub.stopped and hub.count == 0
        assert pool.spawn(hub.broadcast, "late").get(timeout=5) is False
    finally:
        pool.kill()
    with pytest.raises(Closed):
        c.recv(timeout=3)
    assert c.close_code == 1001


# -- several hubs, backplane -----------------------------------------------------------

def test_several_hubs_and_a_connection_in_two(serve: Any) -> None:
    a, b = Hub(name="a"), Hub(name="b")
    room = Room(serve, hubs={"a": a, "b": b})
    only_a = room.join(1, "hubs=a")[0]
    both = room.join(1, "hubs=a,b")[0]
    only_b = room.join(1, "hubs=b")[0]
    assert (a.count, b.count) == (2, 2)
    assert a.broadcast_wait("to a", timeout=5) and b.broadcast_wait("to b", timeout=5)
    assert only_a.recv(timeout=5) == "to a"
    assert only_b.recv(timeout=5) == "to b"
    assert sorted([both.recv(timeout=5), both.recv(timeout=5)]) == ["to a", "to b"]
    a.stop(timeout=3)  # closes its members, shared one included; b notices
    assert wait_until(lambda: b.count == 1, 2)
    assert b.broadcast_wait("b again", timeout=5)
    assert only_b.recv(timeout=5) == "b again"
    only_b.close()
    b.stop()


def test_memory_backplane_links_hubs_of_one_channel(serve: Any) -> None:
    bus: dict[str, list[MemoryBackplane]] = {}
    h1 = Hub(name="chat", backplane=MemoryBackplane(bus))
    h2 = Hub(name="chat", backplane=MemoryBackplane(bus))
    other = Hub(name="other", backplane=MemoryBackplane(bus))
    room1 = Room(serve, hubs={"a": h1})
    room2 = Room(serve, hubs={"a": h2, "o": other})
    sender, peer1 = room1.join(2)
    (peer2,) = room2.join(1, "hubs=a")
    (bystander,) = room2.join(1, "hubs=o")
    sender.send("say:hello")  # exclude=sender on h1; forwarded to h2
    assert peer1.recv(timeout=5) == "hello"
    assert peer2.recv(timeout=5) == "hello"
    h1.broadcast("local only", where=lambda ws: True)  # predicates stay in their process
    h1.broadcast("everywhere")
    assert peer1.recv(timeout=5) == "local only"
    assert peer2.recv(timeout=5) == "everywhere"
    assert h2.stats()["remote"] == 2
    assert [sender.recv(timeout=5), sender.recv(timeout=5)] == ["local only", "everywhere"]
    with pytest.raises(TimeoutError):
        bystander.recv(timeout=0.1)
    h1.stop()
    assert len(bus["chat"]) == 1  # stop detached h1
    for c in (peer2, bystander):
        c.close()
    room2.stop()


# -- storms and leaks ----------------------------------------------------------------

def test_register_unregister_storm_loses_nothing_for_stable_members_and_leaks_nothing(
        serve: Any) -> None:
    room = Room(serve)
    hub = room.hub
    stable = room.join(3)
    stable_ws = list(room.conns)
    churn_srv_ws: list[gstream.WebSocket] = []
    # Warm up lazily created things (the resolver's thread pool grows with
    # concurrent connects) before counting.
    warm = [g.get() for g in gevent.joinall([gevent.spawn(connect, room.url) for _ in range(6)])]
    for c in warm:
        c.close()
    assert wait_until(lambda: hub.count == 3, 3)
    n = 400

    def churn_connections(rounds: int) -> None:
        for _ in range(rounds):
            c = connect(room.url)
            gevent.sleep(0.002)
            c.close()

    def churn_registrations() -> None:
        # Re-register and unregister one stable connection on a second hub
        # and a churn connection on this one, many times.
        extra = Hub()
        extra.start()
        for i in range(300):
            extra.register(stable_ws[0])
            if room.conns[-1] not in stable_ws and room.conns[-1].open:
                hub.register(room.conns[-1])
                churn_srv_ws.append(room.conns[-1])
            extra.unregister(stable_ws[0])
            if i % 10 == 0:
                gevent.sleep(0.001)
        extra.stop()

    with LeakCheck(extra={"members": lambda: hub.count}, greenlet_slack=4, fd_slack=4):
        workers = [gevent.spawn(churn_connections, 25) for _ in range(4)] + [
            gevent.spawn(churn_registrations)]
        for i in range(n):
            assert hub.broadcast_wait(f"s{i}", timeout=5)
            if i % 20 == 0:
                gevent.sleep(0.001)
        with gevent.Timeout(20):
            gevent.joinall(workers, raise_error=True)
        for c in stable:
            assert recv_n(c, n, timeout=10) == [f"s{i}" for i in range(n)]
        assert wait_until(lambda: hub.count == 3, 5), hub.count
    # The hub adds one close callback per connection, however often it re-registers.
    assert len(stable_ws[0]._callbacks) <= 3
    assert hub.stats()["registered"] > 3
    for c in stable:
        c.close()
    room.stop()


def test_mass_close_while_broadcasting_empties_the_hub(serve: Any) -> None:
    room = Room(serve)
    hub = room.hub
    clients = room.join(10)
    flowing = True

    def pump() -> None:
        i = 0
        while flowing:
            hub.broadcast(f"p{i}")
            i += 1
            gevent.sleep(0.001)

    g = gevent.spawn(pump)
    gevent.joinall([gevent.spawn(c.close) for c in clients], timeout=3)
    assert wait_until(lambda: hub.count == 0, 1)
    flowing = False
    g.join(1)
    assert hub.running
    room.stop()


def test_start_is_idempotent_and_run_twice_is_refused() -> None:
    hub = Hub()
    g = hub.start()
    assert hub.start() is g
    gevent.sleep(0.01)
    assert hub.running
    with pytest.raises(RuntimeError):
        hub.run()
    hub.stop(timeout=1)
    assert g.dead and not hub.running
