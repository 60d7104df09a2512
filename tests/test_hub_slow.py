"""Slow-member isolation over real loopback sockets: a member that stops
reading (tiny SO_RCVBUF on the client, tiny SO_SNDBUF on the server side)
fills only its own send buffer; the hub drops its oldest (or newest)
messages and counts them, or closes it with 1013/1008, while the other
members keep receiving promptly."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

import gevent
import pytest

import gstream
from gstream import WSConfig, websocket_app
from gstream.client import connect
from gstream.handler import GStreamHandler
from gstream.hub import Hub
from tests import wsraw
from tests.helpers import wait_until

N = 1500
SIZE = 1024


STALLED_ADDR = "127.0.0.2"  # stalled members connect from here, fast ones from 127.0.0.1


class SmallSendBuffer(GStreamHandler):
    """Shrink the server's send buffer of stalled members so they are felt
    quickly (fast members keep the default: they share this process's CPU
    with the hub, and a tiny buffer would make them look slow too)."""

    def handle(self) -> None:
        if self.client_address[0] == STALLED_ADDR:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().handle()


class SmallSendBufferForAll(GStreamHandler):
    """Every connection gets the small send buffer (for a stalled member
    that cannot choose its source address, e.g. gstream's own client)."""

    def handle(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        super().handle()


def stalled_of(conns: list[gstream.WebSocket]) -> gstream.WebSocket:
    """The server side of the stalled member (registration order may vary)."""
    (ws,) = [c for c in conns if c.environ.get("REMOTE_ADDR") == STALLED_ADDR]
    return ws


def start(serve: Any, hub: Hub, config: WSConfig | None = None,
          handler_class: type[GStreamHandler] = SmallSendBuffer) -> tuple[Any, list[gstream.WebSocket]]:
    conns: list[gstream.WebSocket] = []

    def handler(ws: gstream.WebSocket) -> None:
        hub.register(ws)
        conns.append(ws)
        ws.wait_closed(30)

    hub.start()
    srv = serve(websocket_app(handler, config), handler_class=handler_class)
    return srv, conns


def stalled_member(port: int) -> tuple[socket.socket, bytes]:
    s, status, _, rest = wsraw.handshake(port, source=STALLED_ADDR)
    assert status == 101
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return s, rest


def message(i: int) -> str:
    # "<seq> <send time>" padded to SIZE: readers measure their own latency.
    head = f"{i} {time.monotonic():.6f} "
    return head + "x" * (SIZE - len(head))


class Reader:
    """A fast member: records (seq, latency) of every message as it arrives."""

    def __init__(self, url: str) -> None:
        self.client = connect(url, max_queue=4096)
        # This process also runs the server: a reader starved of CPU for a
        # moment (a loaded CI box) must not be mistaken for a slow member.
        self.client._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.seqs: list[int] = []
        self.worst = 0.0
        self.g = gevent.spawn(self._run)

    def _run(self) -> None:
        for msg in self.client:
            if isinstance(msg, bytes):  # binary blobs: "<seq:4 bytes><random>"
                self.seqs.append(int.from_bytes(msg[:4], "big"))
                continue
            seq, sent, _ = msg.split(" ", 2)
            self.seqs.append(int(seq))
            self.worst = max(self.worst, time.monotonic() - float(sent))

    def close(self) -> None:
        self.client.close()
        self.g.join(2)


def broadcast_all(hub: Hub, n: int = N) -> float:
    t0 = time.monotonic()
    for i in range(n):
        assert hub.broadcast_wait(message(i), timeout=5)
        if i % 25 == 0:
            gevent.sleep(0.001)  # a paced producer, as in a real app
    return time.monotonic() - t0


def read_data_frames(sock: socket.socket, rest: bytes, until: int, timeout: float = 10.0,
                     ) -> tuple[list[int], int | None]:
    """Read the stalled socket: (data-frame sequence numbers, close code or None)."""
    r = wsraw.Reader(sock, rest)
    seqs: list[int] = []
    with gevent.Timeout(timeout):
        while True:
            f = r.next(timeout)
            if f is None:
                return seqs, None
            op, payload, _ = f
            if op == 0x8:
                return seqs, struct.unpack("!H", payload[:2])[0]
            if op == 0x1:
                seqs.append(int(payload.split(b" ", 1)[0]))
                if seqs[-1] == until:
                    return seqs, None


def test_stalled_member_drops_its_oldest_and_the_others_are_not_delayed(serve: Any) -> None:
    hub = Hub()
    srv, conns = start(serve, hub)
    url = f"ws://127.0.0.1:{srv.port}/"
    fast = [Reader(url) for _ in range(3)]
    sock, rest = stalled_member(srv.port)
    assert wait_until(lambda: hub.count == 4, 5)
    stalled_ws = stalled_of(conns)
    elapsed = broadcast_all(hub)
    assert wait_until(lambda: all(len(r.seqs) == N for r in fast), 10)
    for r in fast:
        assert r.seqs == list(range(N))
        assert r.worst < 0.5, r.worst  # one stalled peer never holds the others up
    assert elapsed < 5
    drops = hub.member_drops(stalled_ws)
    assert drops > 0 and hub.stats()["member_drops"] == drops
    assert stalled_ws.send_queue_depth <= stalled_ws.config.send_buffer
    assert hub.stats()["deliveries"] == 3 * N + N  # drop-oldest still queues the new one
    # Reading again, it gets every message that was not dropped, in order,
    # ending with the newest: the oldest ones were the ones dropped.
    seqs, code = read_data_frames(sock, rest, N - 1)
    assert code is None and seqs[-1] == N - 1
    assert seqs == sorted(set(seqs))
    assert len(seqs) + drops == N
    # The queue held the newest send_buffer - 1 behind the one partly sent.
    keep = stalled_ws.config.send_buffer - 1
    assert seqs[-keep:] == list(range(N - keep, N))
    for r in fast:
        r.close()
    sock.close()
    hub.stop()


def test_drop_newest_policy_keeps_the_prefix(serve: Any) -> None:
    hub = Hub(slow_policy="drop_newest")
    srv, conns = start(serve, hub)
    (fast,) = [Reader(f"ws://127.0.0.1:{srv.port}/")]
    sock, rest = stalled_member(srv.port)
    assert wait_until(lambda: hub.count == 2, 5)
    stalled_ws = stalled_of(conns)
    broadcast_all(hub, 800)
    assert wait_until(lambda: len(fast.seqs) == 800, 10)
    drops = hub.member_drops(stalled_ws)
    assert drops > 0
    r = wsraw.Reader(sock, rest)
    seqs: list[int] = []
    with gevent.Timeout(10):
        while len(seqs) < 800 - drops:
            f = r.next()
            assert f is not None
            seqs.append(int(f[1].split(b" ", 1)[0]))
    assert seqs == list(range(800 - drops))
    fast.close()
    sock.close()
    hub.stop()


@pytest.mark.parametrize("code", [1013, 1008])
def test_close_policy_closes_the_slow_member_only(serve: Any, code: int) -> None:
    hub = Hub(slow_policy="close", close_code=code)
    srv, conns = start(serve, hub)
    fast = [Reader(f"ws://127.0.0.1:{srv.port}/") for _ in range(2)]
    sock, rest = stalled_member(srv.port)
    assert wait_until(lambda: hub.count == 3, 5)
    stalled_ws = stalled_of(conns)
    broadcast_all(hub, 800)
    assert wait_until(lambda: all(len(r.seqs) == 800 for r in fast), 10)
    assert all(r.seqs == list(range(800)) and r.worst < 0.5 for r in fast)
    st = hub.stats()
    assert st["closed_slow"] == 1 and st["members"] == 2 and stalled_ws not in hub
    assert stalled_ws.close_code == code and stalled_ws.close_reason == "too slow"
    # Once it reads again it finds its backlog, then the close frame.
    seqs, got = read_data_frames(sock, rest, -1)
    assert got == code
    assert seqs == list(range(len(seqs)))
    for r in fast:
        r.close()
    sock.close()
    hub.stop()


def test_deflate_member_falls_back_to_dropping_the_newest_and_stays_decodable(serve: Any) -> None:
    # Compressed frames depend on each other (context takeover), so queued
    # ones cannot be dropped: the new one is refused instead.
    hub = Hub()
    srv, conns = start(serve, hub, WSConfig(compression=True), SmallSendBufferForAll)
    url = f"ws://127.0.0.1:{srv.port}/"
    fast = Reader(url)
    slow = connect(url, compression="deflate", max_queue=1)  # stops reading when 1 is queued
    slow._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert wait_until(lambda: hub.count == 2, 5)
    slow_port = str(slow._sock.getsockname()[1])
    (stalled_ws,) = [c for c in conns if c.environ.get("REMOTE_PORT") == slow_port]
    assert not stalled_ws.shares_frames
    n = 600
    blobs = [i.to_bytes(4, "big") + os.urandom(2044) for i in range(n)]  # incompressible
    for i, b in enumerate(blobs):
        assert hub.broadcast_wait(b, timeout=5)
        if i % 2 == 0:
            gevent.sleep(0.001)  # 2 KiB messages through a 4 KiB server send buffer
    assert wait_until(lambda: len(fast.seqs) == n, 10), len(fast.seqs)
    assert fast.seqs == list(range(n))
    drops = hub.member_drops(stalled_ws)
    assert drops > 0
    with gevent.Timeout(10):
        got = [slow.recv() for _ in range(n - drops)]  # inflates fine: no frame vanished
    assert got == blobs[: n - drops]
    fast.close()
    slow.close()
    hub.stop()


def test_send_prepared_drop_oldest_primitive(serve: Any) -> None:
    results: list[int] = []
    depths: list[int] = []
    done = gevent.event.Event()

    def handler(ws: gstream.WebSocket) -> None:
        gevent.sleep(0.05)  # let the client shrink its buffer
        for i in range(300):
            results.append(ws.send_prepared_drop_oldest(gstream.prepare(f"{i}:" + "y" * 4000)))
            depths.append(ws.send_queue_depth)
        done.set()
        ws.wait_closed(10)

    srv = serve(websocket_app(handler, WSConfig(send_buffer=4)), handler_class=SmallSendBuffer)
    sock, rest = stalled_member(srv.port)
    assert done.wait(5)
    assert max(depths) <= 4 and all(n in (0, 1) for n in results)
    dropped = sum(results)
    assert dropped > 0
    r = wsraw.Reader(sock, rest)
    seqs = []
    with gevent.Timeout(10):
        while not seqs or seqs[-1] != 299:
            f = r.next()
            assert f is not None
            seqs.append(int(f[1].split(b":", 1)[0]))
    assert len(seqs) + dropped == 300 and seqs == sorted(seqs)
    sock.close()
