"""SSEBroker's shared batch (docs/broker.md, "One join per batch"; issue 21): idle
drop-oldest streams without a filter follow one broker-level batch, joined (and
chunk-framed) once and sent as the same bytes object to each; everyone else, and a
follower whose write is pending, keeps the per-subscriber queue, with exactly the
drops, missed notices, counters and order of that path."""

from __future__ import annotations

import json
from typing import Any

import gevent

from gstream import detached
from gstream.broker import SSEBroker
from gstream.events import Event
from tests.helpers import RecordingSocket, SSEStream, wait_until


def _streams(gserver: Any, broker: SSEBroker, paths: list[str]) -> list[SSEStream]:
    srv = gserver(broker.subscribe)
    clients = [SSEStream(srv.port, p) for p in paths]
    assert all(c.status == 200 for c in clients)
    assert wait_until(lambda: detached.detached_streams() == len(paths), 5)
    for c in clients:
        assert c.reader.read_chunk().startswith(b": stream open")
    return clients


def _record_all() -> list[RecordingSocket]:
    recorders = []
    for stream in list(detached._open):
        rec = RecordingSocket(stream.sock)
        stream.sock = rec
        recorders.append(rec)
    return recorders


def _data(events: list[Any]) -> list[str]:
    return [e.data for e in events]


def test_a_batch_is_joined_once_and_the_same_bytes_go_to_every_follower(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    clients = _streams(gserver, broker, ["/?buffer=256"] * 6)
    recorders = _record_all()
    assert len(recorders) == 6
    sent = [f"m{i}" for i in range(40)]
    before = broker.stats()
    for m in sent:  # no yield: one batch
        broker.publish(m)
    # Counters and depths are exact while the batch waits for the wake-up.
    mid = broker.stats()
    assert mid["enqueued"] - before["enqueued"] == 6 * 40
    assert mid["delivered"] == before["delivered"]
    assert [s["depth"] for s in broker.subscribers()] == [40] * 6
    for c in clients:
        assert _data(c.events(40)) == sent
    first = recorders[0].sent
    assert len(first) == 1, len(first)
    for rec in recorders:
        # The very same (chunk-framed) bytes object: one join and one framing for
        # all six, where each stream used to join and frame its own copy.
        assert len(rec.sent) == 1 and rec.sent[0] is first[0]
    after = broker.stats()
    assert after["delivered"] - before["delivered"] == 6 * 40
    assert after["dropped"] == 0
    assert [s["depth"] for s in broker.subscribers()] == [0] * 6
    # The next batch is shared again.
    for m in ("n0", "n1"):
        broker.publish(m)
    for c in clients:
        assert _data(c.events(2)) == ["n0", "n1"]
    second = recorders[0].sent[1]
    assert all(len(r.sent) == 2 and r.sent[1] is second for r in recorders)
    for c in clients:
        c.close()


def test_a_follower_with_a_small_buffer_gets_the_last_of_a_batch_and_a_missed_notice(
        gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    small, big = _streams(gserver, broker, ["/?buffer=4&subscriber_id=small",
                                            "/?buffer=1024&subscriber_id=big"])
    for i in range(60):  # one batch, longer than the small buffer
        broker.publish(Event(data=f"e{i}", id=str(i)))
    by_id = {s["subscriber_id"]: s for s in broker.subscribers()}
    assert (by_id["small"]["depth"], by_id["small"]["dropped"]) == (4, 56)
    assert (by_id["big"]["depth"], by_id["big"]["dropped"]) == (60, 0)
    assert broker.stats()["dropped"] == 56
    got = small.events(5)
    assert got[0].event == "gstream.missed" and json.loads(got[0].data) == {"missed": 56}
    assert [(e.data, e.last_event_id) for e in got[1:]] == [(f"e{i}", str(i)) for i in range(56, 60)]
    assert _data(big.events(60)) == [f"e{i}" for i in range(60)]
    # Back on the shared path afterwards, with nothing more missed.
    broker.publish(Event(data="next", id="60"))
    assert [(e.event, e.data) for e in small.events(1)] == [("message", "next")]
    assert big.next_event().data == "next"
    st = broker.stats()
    assert (st["enqueued"], st["delivered"], st["dropped"]) == (122, 66, 56)
    small.close()
    big.close()


def test_a_follower_that_stalls_leaves_the_batch_and_loses_only_what_its_queue_drops(
        gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None)
    srv = gserver(broker.subscribe)
    stalled = SSEStream(srv.port, "/?buffer=8&subscriber_id=stalled", rcvbuf=4096)
    reader = SSEStream(srv.port, "/?buffer=1024&subscriber_id=reader")
    assert wait_until(lambda: detached.detached_streams() == 2, 5)
    got: list[Any] = []

    def read_all() -> None:
        while not got or got[-1].last_event_id != "end":
            got.append(reader.next_event(20))

    reading = gevent.spawn(read_all)
    big = "x" * 16384
    sent = 0
    # Until the stalled client's socket buffers are full and its queue overflows.
    while broker.stats()["dropped"] == 0 and sent < 2000:
        broker.publish(Event(data=big, id=str(sent)))
        sent += 1
        gevent.sleep(0)
    by_id = {s["subscriber_id"]: s for s in broker.subscribers()}
    # It left the shared batch: its own queue, full at its buffer, drops its oldest.
    assert by_id["stalled"]["depth"] == 8
    for _ in range(20):
        broker.publish(Event(data=big, id=str(sent)))
        sent += 1
    broker.publish(Event(data="end", id="end"))
    reading.get(timeout=30)
    assert [e.last_event_id for e in got] == [str(i) for i in range(sent)] + ["end"]
    dropped = {s["subscriber_id"]: s["dropped"] for s in broker.subscribers()}
    assert dropped["reader"] == 0 and dropped["stalled"] == broker.stats()["dropped"] > 0
    events: list[Any] = []
    with gevent.Timeout(30):
        while not events or events[-1].last_event_id != "end":
            events.append(stalled.next_event(20))
    missed = [json.loads(e.data)["missed"] for e in events if e.event == "gstream.missed"]
    ids = [e.last_event_id for e in events if e.event != "gstream.missed"]
    assert ids[-8:] == [str(i) for i in range(sent - 7, sent)] + ["end"]  # its queue: 8
    assert [int(i) for i in ids[:-1]] == sorted(int(i) for i in ids[:-1])
    # Every event either arrived or was counted, exactly as the broker counted it.
    assert len(ids) + sum(missed) == sent + 1
    assert sum(missed) == dropped["stalled"]
    stalled.close()
    reader.close()


def test_filtered_and_following_streams_interleaved_get_exact_sequences(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None, allow_client_slow_mode=True)
    plain, only_a, block, plain2 = _streams(gserver, broker, [
        "/?buffer=1024", "/?event=a&buffer=1024", "/?slow=block&buffer=1024", "/?buffer=1024"])
    names = ["a", "b", "message", "a", "c"]
    published: list[tuple[str, str, str]] = []
    for burst in range(6):
        for i in range(7 + burst * 5):
            name = names[(burst + i) % len(names)]
            ident = f"{burst}.{i}"
            broker.publish(Event(data=f"d{ident}", id=ident,
                                 name=None if name == "message" else name))
            published.append((name, f"d{ident}", ident))
            if i % 3 == 2:
                gevent.sleep(0)  # batches of varied length and boundaries
        gevent.sleep(0.01)
    n = len(published)
    for c in (plain, block, plain2):
        assert [(e.event, e.data, e.last_event_id) for e in c.events(n)] == published
    want = [p for p in published if p[0] == "a"]
    assert [(e.event, e.data, e.last_event_id) for e in only_a.events(len(want))] == want
    st = broker.stats()
    assert (st["enqueued"], st["dropped"]) == (3 * n + len(want), 0)
    assert wait_until(lambda: broker.stats()["delivered"] == 3 * n + len(want), 5)
    for c in (plain, only_a, block, plain2):
        c.close()


def test_followers_get_their_batch_before_a_final_event(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=None, retry=0)
    clients = _streams(gserver, broker, ["/?buffer=1024"] * 3)
    for i in range(5):
        broker.publish(f"e{i}")
    broker.close()  # before the wake-up: the batch, then done
    for c in clients:
        assert _data(c.read_until_end()) == [f"e{i}" for i in range(5)] + ["[DONE]"]
        c.close()


def test_followers_under_plain_pywsgi_keep_order(serve: Any) -> None:
    # The iterator form (a reader greenlet per stream) follows the batch too.
    broker = SSEBroker(heartbeat_interval=None)
    srv = serve(broker.subscribe)
    clients = [SSEStream(srv.port, "/?buffer=1024") for _ in range(4)]
    assert wait_until(lambda: broker.subscriber_count == 4, 5)
    sent = []
    for i in range(150):
        broker.publish(f"p{i}")
        sent.append(f"p{i}")
        if i % 10 == 9:
            gevent.sleep(0)
    for c in clients:
        assert _data(c.events(150)) == sent
    assert wait_until(lambda: broker.stats()["delivered"] == 600, 5)
    for c in clients:
        c.close()


def test_a_presence_event_queued_mid_batch_comes_after_the_batch(gserver: Any) -> None:
    from gstream.presence import MemoryPresence, PresenceChange, PresenceEvent

    p = MemoryPresence()
    broker = SSEBroker(topic="news", presence=p, presence_events=True, heartbeat_interval=None)
    clients = _streams(gserver, broker, ["/?buffer=1024"] * 3)
    for i in range(3):
        broker.publish(f"e{i}")
    # A presence frame queued outside the history, mid-batch (the watcher's call,
    # made here directly: the store notifies its watchers asynchronously).
    broker._on_presence(PresenceEvent(PresenceChange.JOIN, "news", "bob", None, 1, 1))
    broker.publish("e3")
    for c in clients:
        got: list[tuple[str, str]] = []
        while len(got) < 5:
            e = c.next_event()
            item = (e.event, e.data if e.event == "message" else json.loads(e.data)["member"])
            if not item[1].startswith("anon:"):  # the streams' own joins, before the test's
                got.append(item)
        assert got == [("message", "e0"), ("message", "e1"), ("message", "e2"),
                       ("gstream.join", "bob"), ("message", "e3")]
    st = broker.stats()
    assert (st["enqueued"], st["dropped"]) == (12, 0)  # presence frames are not counted
    for c in clients:
        c.close()


def test_idle_followers_heartbeat_without_piling_up_wait_entries(gserver: Any) -> None:
    broker = SSEBroker(heartbeat_interval=0.05)
    clients = _streams(gserver, broker, ["/"] * 5)
    for c in clients:
        with gevent.Timeout(10):
            beats = 0
            while beats < 8:
                beats += c.reader.read_chunk().count(b": heartbeat")
    # Each follower waits for the next frame once, however many heartbeats it got.
    assert sorted(map(id, broker._fwait)) == sorted(map(id, set(broker._fwait)))
    assert len(broker._fwait) <= 5
    broker.publish("after")
    for c in clients:
        assert c.next_event().data == "after"
        c.close()
