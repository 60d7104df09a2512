"""SSEBroker's batched wake-ups and shared heartbeat timer (docs/performance.md):
a burst is written in few sends, bounded bursts, and no timer per idle stream."""

import gevent

from gstream.broker import MAX_BATCH, SSEBroker
from tests.helpers import SSEStream, wait_until


def _open(serve, **cfg):  # type: ignore[no-untyped-def]
    broker = SSEBroker(**cfg)
    srv = serve(broker.subscribe)
    s = SSEStream(srv.port, "/?buffer=1024")
    assert s.status == 200
    assert wait_until(lambda: broker.subscriber_count == 1, 3)
    assert s.reader.read_chunk().startswith(b": stream open\n\n")  # with the retry hint
    return broker, s


def _chunks_until(s, n_events: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    chunks: list[bytes] = []
    with gevent.Timeout(5):
        while sum(c.count(b"data: ") for c in chunks) < n_events:
            chunks.append(s.reader.read_chunk())
    return chunks


def test_burst_with_yields_is_coalesced(serve) -> None:  # type: ignore[no-untyped-def]
    broker, s = _open(serve, heartbeat_interval=None)
    for i in range(10):
        broker.publish(f"e{i}")
        gevent.sleep(0)  # the publisher yields, as a polite one does
    chunks = _chunks_until(s, 10)
    # One wake-up and one write for the whole burst, not one per event.
    assert len(chunks) == 1
    assert [line for line in b"".join(chunks).split(b"\n") if line.startswith(b"data")] == [
        f"data: e{i}".encode() for i in range(10)]
    s.close()


def test_long_burst_is_cut_into_bounded_batches(serve) -> None:  # type: ignore[no-untyped-def]
    broker, s = _open(serve, heartbeat_interval=None)
    n = MAX_BATCH * 3
    for i in range(n):
        broker.publish(f"e{i}")
        gevent.sleep(0)
    chunks = _chunks_until(s, n)
    assert max(c.count(b"data: ") for c in chunks) <= MAX_BATCH
    assert len(chunks) <= 4
    s.close()


def test_idle_streams_share_one_heartbeat_timer(serve) -> None:  # type: ignore[no-untyped-def]
    broker = SSEBroker(heartbeat_interval=0.2)
    srv = serve(broker.subscribe)
    streams = [SSEStream(srv.port, "/") for _ in range(20)]
    assert wait_until(lambda: broker.subscriber_count == 20, 3)
    loop = gevent.get_hub().loop
    gevent.sleep(0.1)
    # Every stream is asleep; the only active timers are the broker's one
    # heartbeat timer (and whatever the test machinery has: far fewer than 20).
    assert loop.activecnt < 20
    for s in streams:
        assert s.reader.read_chunk().startswith(b": stream open")
        with gevent.Timeout(2):
            assert s.reader.read_chunk() == b": heartbeat\n\n"
    for s in streams:
        s.close()
