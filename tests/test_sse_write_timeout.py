"""A stream whose client stopped reading (or vanished without a FIN) is closed after
``BrokerConfig.write_timeout``, in both serving forms; readers and idle streams are not.

Without it such a client kept its connection, its seat under the server's cap and one
pending chunk for as long as the server ran (drop-oldest bounds the memory, not the time).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from gstream.broker import SSEBroker
from gstream.detached import detached_streams
from gstream.events import Event
from gstream.handler import GStreamHandler
from tests.helpers import SSEStream, wait_until

BIG = "x" * 16384


def _reader(stream: SSEStream, got: list[str]) -> gevent.Greenlet:
    """A client that keeps reading: every event's id into ``got``."""

    def run() -> None:
        try:
            while True:
                got.append(stream.next_event(timeout=30).last_event_id)
        except (EOFError, OSError, gevent.Timeout):
            pass

    return gevent.spawn(run)


def _publish_until_stalled(broker: SSEBroker, key_of_stalled: str, limit: int = 4000) -> int:
    """Publish big events until the stalled client's queue overflows (its write is stuck)."""
    sent = 0
    while sent < limit:
        subs = {s["subscriber_id"]: s for s in broker.subscribers()}
        if subs.get(key_of_stalled, {}).get("dropped", 0) > 0:
            return sent
        broker.publish(Event(data=BIG, id=str(sent)))
        sent += 1
        gevent.sleep(0.001)  # lets the batched wake-up write before the next one
    raise AssertionError("the stream never stalled")


@pytest.mark.parametrize("form", ["detached", "greenlet"])
def test_a_client_that_stops_reading_is_closed_after_write_timeout(
        form: str, gserver: Any, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gstream.broker")
    broker = SSEBroker(heartbeat_interval=None, write_timeout=0.6, default_buffer=4,
                       max_buffer=4096)
    if form == "detached":
        srv = gserver(broker.subscribe)
    else:
        srv = serve(broker.subscribe, WSGIServer, handler_class=GStreamHandler)
    stuck = SSEStream(srv.port, "/?subscriber_id=stuck", rcvbuf=4096, timeout=30)
    good = SSEStream(srv.port, "/?subscriber_id=good&buffer=4096", timeout=30)
    assert wait_until(lambda: broker.subscriber_count == 2, 5)
    assert detached_streams() == (2 if form == "detached" else 0)
    got: list[str] = []
    reader = _reader(good, got)
    sent = _publish_until_stalled(broker, "stuck")
    began = time.monotonic()
    # Still pending, the stuck stream is closed within ~1.25 write timeouts
    # (generous bound: shared cores).
    assert wait_until(lambda: broker.stats()["stalled"] == 1, 10)
    assert time.monotonic() - began < 0.6 * 1.25 + 5
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    assert [s["subscriber_id"] for s in broker.subscribers()] == ["good"]
    if form == "detached":
        assert wait_until(lambda: detached_streams() == 1 and srv.connections == 1, 5)
    assert any("a write to it took over 0.6s" in r.getMessage() for r in caplog.records)
    assert broker.stats()["cut"] == 0  # not a block-mode cut
    # The reader lost nothing, and still gets what comes next.
    for i in range(3):
        broker.publish(Event(data="after", id=f"after{i}"))
    assert wait_until(lambda: len(got) == sent + 3, 15), (len(got), sent)
    assert got == [str(i) for i in range(sent)] + ["after0", "after1", "after2"]
    # The stuck client finds its connection ended (what its buffers held, then EOF or RST).
    stuck.sock.settimeout(10)
    with gevent.Timeout(15):
        try:
            while stuck.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
    stuck.close()
    good.close()
    reader.join(5)


def test_idle_and_slowly_reading_streams_stay_open(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=0.2, write_timeout=0.3)
    srv = gserver(broker.subscribe)
    idle = SSEStream(srv.port, "/", timeout=10)
    slow = SSEStream(srv.port, "/", rcvbuf=4096, timeout=10)
    assert wait_until(lambda: broker.subscriber_count == 2, 5)
    # Idle for many write timeouts (heartbeats only), and a client that reads
    # each burst within the timeout though its buffer is small.
    got: list[str] = []
    deadline = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < deadline:
        broker.publish(Event(data="y" * 2000, id=str(n)))
        n += 1
        with gevent.Timeout(5):
            while len(got) < n:
                got.append(slow.next_event().last_event_id)
        gevent.sleep(0.05)
    assert got == [str(i) for i in range(n)]
    assert broker.stats()["stalled"] == 0 and broker.subscriber_count == 2
    assert idle.sock.recv(65536)  # heartbeats and events reached the idle one too
    idle.close()
    slow.close()
    assert wait_until(lambda: broker.subscriber_count == 0 and srv.connections == 0, 5)


def test_a_replaced_stream_stuck_in_its_last_write_is_closed_too(gserver: Any) -> None:
    # A stream replaced by a newer one with the same subscriber id leaves the
    # broker's map at once but still owes its client a final event; if that
    # client stopped reading, the stall check must still find it.
    broker = SSEBroker(heartbeat_interval=None, write_timeout=0.6, default_buffer=4,
                       principal=lambda environ: "user")  # one user: the same id replaces
    srv = gserver(broker.subscribe)
    old = SSEStream(srv.port, "/?subscriber_id=tab", rcvbuf=4096, timeout=30)
    assert wait_until(lambda: broker.subscriber_count == 1, 5)
    _publish_until_stalled(broker, "tab")
    new = SSEStream(srv.port, "/?subscriber_id=tab", timeout=30)
    assert wait_until(lambda: broker.stats()["evicted"] == 1, 5)
    assert wait_until(lambda: broker.stats()["stalled"] == 1, 10)
    assert wait_until(lambda: broker.subscriber_count == 1 and srv.connections == 1, 5)
    broker.publish(Event(data="for the new one", id="n1"))
    assert new.next_event(timeout=10).data == "for the new one"
    old.close()
    new.close()


def test_write_timeout_none_or_zero_never_gives_up() -> None:
    assert SSEBroker(write_timeout=0).config.write_timeout is None
    assert SSEBroker(write_timeout=-1).config.write_timeout is None
    assert SSEBroker().config.write_timeout == 30.0
