"""Slow subscribers over real loopback sockets: clients that stop reading so
that the kernel buffers fill (tiny SO_RCVBUF on the client, tiny SO_SNDBUF on
the server's connection), drop-oldest accounting, and bounded block mode."""

import json
import socket
import time

import gevent
from gevent.pywsgi import WSGIHandler

from gstream import Event
from gstream.broker import MISSED_EVENT, SSEBroker
from gstream.sseparse import EventStreamParser
from tests.helpers import ChunkedReader, SSEStream, read_response_head, wait_until

BIG = "x" * 65536


class SmallSendBuffer(WSGIHandler):
    """Shrink the server's send buffer so a stalled client is felt quickly."""

    def handle(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return super().handle()


def start(serve, **cfg):
    broker = SSEBroker(**cfg)
    srv = serve(broker.subscribe, handler_class=SmallSendBuffer)
    return broker, srv


def stalled_client(port, path):
    """Connect with a tiny receive buffer, read the head, then stop reading."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, _, rest = read_response_head(s)
    assert status == 200
    return s, rest


class Collector:
    """A healthy subscriber read continuously by its own greenlet."""

    def __init__(self, port, path="/?buffer=1024"):
        self.stream = SSEStream(port, path)
        self.events = []
        self.arrivals = []
        self.g = gevent.spawn(self._run)

    def _run(self):
        try:
            while True:
                ev = self.stream.next_event(timeout=30)
                self.events.append(ev)
                self.arrivals.append((ev.data[:12], time.monotonic()))
        except (EOFError, OSError, gevent.Timeout):
            pass

    def close(self):
        self.g.kill()
        self.stream.close()


def big(i):
    return Event(data=f"{i:06d}" + BIG)


def test_drop_oldest_under_stalled_reader_reports_missed(serve):
    broker, srv = start(serve)
    healthy = Collector(srv.port)
    sock, rest = stalled_client(srv.port, "/?buffer=4&subscriber_id=slow")
    assert wait_until(lambda: broker.subscriber_count == 2, 3)

    def slow_info():
        return next(i for i in broker.subscribers() if i["subscriber_id"] == "slow")

    n = 0
    while slow_info()["depth"] < 4 and n < 400:  # until the kernel buffers are full
        broker.publish(big(n))
        n += 1
        gevent.sleep(0.001)
    assert slow_info()["depth"] == 4, "the stalled reader never filled its queue"
    for _ in range(20):
        broker.publish(big(n))
        n += 1
    assert slow_info()["dropped"] >= 20
    # The healthy subscriber lost nothing meanwhile.
    assert wait_until(lambda: len(healthy.events) == n, 10)
    assert [int(e.data[:6]) for e in healthy.events] == list(range(n))

    # Now the slow client reads everything; each event is either received
    # or accounted for in a gstream.missed event, and the newest ones survive.
    reader, parser = ChunkedReader(sock, rest), EventStreamParser()
    received, missed = [], 0
    with gevent.Timeout(10):
        while not received or received[-1] != n - 1:
            for ev in parser.feed(reader.read_chunk()):
                if ev.event == MISSED_EVENT:
                    missed += json.loads(ev.data)["missed"]
                else:
                    received.append(int(ev.data[:6]))
    assert received == sorted(set(received)), "out of order or duplicated"
    assert received[-4:] == list(range(n - 4, n))
    assert missed > 0 and missed + len(received) == n
    assert missed == slow_info()["dropped"] == broker.stats()["dropped"]
    sock.close()
    healthy.close()


def test_block_mode_bounded_by_timeout_and_others_unaffected(serve):
    broker, srv = start(serve, allow_client_slow_mode=True, block_timeout=1.0)
    healthy = Collector(srv.port)
    sock, _ = stalled_client(srv.port, "/?slow=block&buffer=2")
    assert wait_until(lambda: broker.subscriber_count == 2, 3)
    assert sorted(i["mode"] for i in broker.subscribers()) == ["block", "drop-oldest"]

    durations = []
    n = 0
    while broker.stats()["cut"] == 0 and n < 400:
        t0 = time.monotonic()
        broker.publish(big(n))
        durations.append((n, t0, time.monotonic() - t0))
        n += 1
    assert broker.stats()["cut"] == 1, "the stalled block-mode subscriber was never cut loose"
    worst_n, worst_t0, worst = max(durations, key=lambda d: d[2])
    assert 0.9 <= worst < 1.6, worst
    # The healthy subscriber got the blocking event long before the publish returned.
    assert wait_until(lambda: len(healthy.events) == n, 10)
    arrived = dict(healthy.arrivals)[f"{worst_n:06d}" + BIG[:6]]
    assert arrived - worst_t0 < 0.5
    # Cut loose: unregistered, and later publishes are immediate.
    assert broker.subscriber_count == 1
    t0 = time.monotonic()
    broker.publish(big(n))
    assert time.monotonic() - t0 < 0.1
    # Its connection was closed by the server: reading ends with EOF or reset.
    with gevent.Timeout(10):
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
    sock.close()
    healthy.close()


def test_block_mode_is_lossless_for_a_live_reader(serve):
    """Item 56: a full block-mode queue makes publish wait for room."""
    broker, srv = start(serve, allow_client_slow_mode=True)
    s = SSEStream(srv.port, "/?buffer=1", {"X-SSE-Slow": "block"})
    assert wait_until(lambda: broker.subscriber_count == 1, 3)
    got = []
    g = gevent.spawn(lambda: got.extend(s.events(200, timeout=10)))
    for i in range(200):
        broker.publish(str(i))
    g.join(timeout=10)
    assert [e.data for e in got] == [str(i) for i in range(200)]
    assert broker.stats()["dropped"] == 0
    s.close()


def test_slow_mode_requires_opt_in(serve):
    """Items 57, 58: query or header selects block only when allowed, exactly 'block'."""
    allowed, srv_a = start(serve, allow_client_slow_mode=True)
    denied, srv_d = start(serve)
    streams = [
        SSEStream(srv_a.port, "/?slow=block&subscriber_id=q"),
        SSEStream(srv_a.port, "/?subscriber_id=h", {"X-SSE-Slow": "block"}),
        SSEStream(srv_a.port, "/?slow=Block&subscriber_id=n"),
        SSEStream(srv_d.port, "/?slow=block&subscriber_id=d1", {"X-SSE-Slow": "block"}),
    ]
    assert wait_until(lambda: allowed.subscriber_count == 3 and denied.subscriber_count == 1, 3)
    modes = {i["subscriber_id"]: i["mode"] for i in allowed.subscribers() + denied.subscribers()}
    assert modes == {"q": "block", "h": "block", "n": "drop-oldest", "d1": "drop-oldest"}
    for s in streams:
        s.close()


def test_block_subscriber_disconnect_unblocks_publish(serve):
    """Item 74: a publish waiting on a block-mode subscriber returns once it leaves."""
    broker, srv = start(serve, allow_client_slow_mode=True, block_timeout=5)
    sock, _ = stalled_client(srv.port, "/?slow=block&buffer=1")
    assert wait_until(lambda: broker.subscriber_count == 1, 3)
    state = {"n": 0, "blocked_at": None}

    def publisher():
        while state["n"] < 400:
            broker.publish(big(state["n"]))
            state["n"] += 1

    g = gevent.spawn(publisher)
    # Wait until the publisher is stuck waiting for room.
    last = -1
    with gevent.Timeout(10):
        while True:
            gevent.sleep(0.2)
            if state["n"] == last:
                break
            last = state["n"]
    t0 = time.monotonic()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # reset: the server's blocked write fails at once
    assert wait_until(lambda: state["n"] > last, 3)
    assert time.monotonic() - t0 < 2
    g.kill()
    assert wait_until(lambda: broker.subscriber_count == 0, 3)
    assert broker.stats()["cut"] == 0
