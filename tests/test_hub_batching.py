"""Hub batching (docs/hub.md, docs/performance.md): a burst of broadcasts is
queued to every member and flushed once, so each member gets few sends, and
a burst longer than a member's send buffer costs a fast reader nothing."""

from __future__ import annotations

import gc
from typing import Any

import gevent

from gstream import WSConfig
from gstream.hub import Hub
from gstream.websocket import prepare
from tests.test_hub import Room, recv_n


class CountingSocket:
    """Wraps a connection's real OS socket and counts its ``send`` calls."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.sends = 0

    def send(self, data: Any) -> int:
        self.sends += 1
        return self.raw.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _count_sends(room: Room) -> list[CountingSocket]:
    counters = []
    for ws in room.conns:
        counter = CountingSocket(ws._raw)
        ws._raw = counter
        counters.append(counter)
    return counters


def test_polite_burst_leaves_in_few_sends_per_member(serve: Any) -> None:
    room = Room(serve)
    clients = room.join(3)
    counters = _count_sends(room)
    msgs = [f"m{i}" for i in range(50)]
    for m in msgs:
        assert room.hub.broadcast(m)
        gevent.sleep(0)  # a polite publisher yields between messages
    for c in clients:
        assert recv_n(c, 50) == msgs
    # Before batching each member got one send per message (50).
    assert max(c.sends for c in counters) <= 5, [c.sends for c in counters]
    st = room.hub.stats()
    assert (st["deliveries"], st["member_drops"]) == (150, 0)
    for c in clients:
        c.close()
    room.stop()


def test_burst_longer_than_send_buffer_drops_nothing_for_fast_readers(serve: Any) -> None:
    room = Room(serve, hubs={"a": Hub(name="a", slow_policy="drop_newest")},
                config=WSConfig(send_buffer=4))
    clients = room.join(4)
    msgs = [f"x{i}" for i in range(200)]
    for m in msgs:  # no yield at all: the whole burst is in the channel at once
        assert room.hub.broadcast(m)
    for c in clients:
        assert recv_n(c, 200) == msgs
    st = room.hub.stats()
    assert (st["deliveries"], st["member_drops"]) == (800, 0)
    for c in clients:
        c.close()
    room.stop()


def test_a_batch_longer_than_send_buffer_leaves_in_one_send(serve: Any) -> None:
    # A batch's own frames do not count against send_buffer (32 by default)
    # while the member reads: 64 messages cost it one send, not two (issue 21).
    room = Room(serve)
    clients = room.join(3)
    counters = _count_sends(room)
    msgs = [f"b{i}" for i in range(64)]
    for m in msgs:  # all in the channel before the hub runs: one batch of 64
        assert room.hub.broadcast(m)
    for c in clients:
        assert recv_n(c, 64) == msgs
    assert max(c.sends for c in counters) == 1, [c.sends for c in counters]
    st = room.hub.stats()
    assert (st["deliveries"], st["member_drops"]) == (192, 0)
    for c in clients:
        c.close()
    room.stop()


def test_a_trickle_is_not_held_back(serve: Any) -> None:
    # A lone message must leave at once, not wait for a batch to fill.
    room = Room(serve)
    (client,) = room.join(1)
    for i in range(5):
        assert room.hub.broadcast(f"t{i}")
        with gevent.Timeout(0.5):
            assert client.recv() == f"t{i}"
    client.close()
    room.stop()


def test_queueing_a_shared_frame_allocates_nothing_the_collector_tracks(serve: Any) -> None:
    # A burst to 5,000 members queues 5,000 frames per message; when each
    # queued frame cost a tracked object (a tuple), that alone drove the
    # collector into full passes over every connection mid-burst (~70 ms at
    # 5,000 connections). Queue 500 frames with the collector off and count.
    room = Room(serve, config=WSConfig(send_buffer=1000))
    (client,) = room.join(1)
    (ws,) = room.conns
    frames = [prepare(f"g{i}").frame for i in range(500)]
    gc.disable()
    try:
        before = gc.get_count()[0]
        for frame in frames:
            assert ws.push_shared(frame)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    ws.flush()
    assert grown < 50, grown
    assert recv_n(client, 500) == [f"g{i}" for i in range(500)]
    client.close()
    room.stop()
