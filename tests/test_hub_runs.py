"""Hub runs (docs/hub.md, issue 21): consecutive messages that every member takes are
joined once per batch into one ``PreparedRun`` that each member queues with one call; the
outbox counts the messages inside a run exactly (partial sends, drop-oldest), and every
member still gets its messages in order."""

from __future__ import annotations

import gc
import random
import socket
from typing import Any

import gevent
import gevent.event

import gstream
from gstream import WSConfig, websocket_app
from gstream.hub import Hub
from gstream.websocket import PreparedRun, prepare, prepare_run
from tests import wsraw
from tests.helpers import RecordingSocket, wait_until
from tests.test_hub import Room, recv_n
from tests.test_hub_slow import SmallSendBuffer, read_data_frames, stalled_member, start


def test_a_batch_for_everyone_is_joined_once_and_shared_by_all_members(serve: Any) -> None:
    room = Room(serve)
    clients = room.join(6)
    recorders = []
    for ws in room.conns:
        rec = RecordingSocket(ws._raw)
        ws._raw = rec
        recorders.append(rec)
    msgs = [f"r{i}" for i in range(64)]
    for m in msgs:  # all in the channel before the hub runs: one batch
        assert room.hub.broadcast(m)
    for c in clients:
        assert recv_n(c, 64) == msgs
    first = recorders[0].sent
    assert 1 <= len(first) <= 2, len(first)  # 2 only if a loaded machine split the batch
    for rec in recorders:
        # The very same bytes objects: joined once, not once per member (before
        # issue 21's runs each member's flush joined its own 64 frames).
        assert len(rec.sent) == len(first) and all(a is b for a, b in zip(rec.sent, first, strict=True))
    assert sum(r.messages if isinstance(r, PreparedRun) else 1 for r in first) == 64
    st = room.hub.stats()
    assert (st["fanned_out"], st["deliveries"], st["member_drops"]) == (64, 6 * 64, 0)
    for c in clients:
        c.close()
    room.stop()


def test_mixed_runs_keep_every_members_order(serve: Any) -> None:
    # Plain runs of varied length between exclude and where messages, a deflate
    # member beside the frame-sharing ones: each member's stream is exactly
    # its subsequence of the broadcasts, in order. (A deflate member has no
    # batch allowance: its send_buffer must hold a whole burst.)
    room = Room(serve, config=WSConfig(compression=True, send_buffer=256))
    clients = {key: room.join(1, f"user={key}")[0] for key in ("a", "b", "c")}
    clients["d"] = room.join(1, "user=d", compression="deflate")[0]
    by_key = {room.hub.key_of(ws): ws for ws in room.conns}
    assert sorted(ws.shares_frames for ws in room.conns) == [False, True, True, True]
    rng = random.Random(21)
    expected: dict[str, list[Any]] = {key: [] for key in clients}
    for burst in (60, 100):
        for i in range(burst):
            msg: str | bytes = f"{burst}-{i}" if i % 3 else f"{burst}-{i}".encode()
            kind = rng.choice(["plain"] * 4 + ["exclude", "where"])
            if kind == "plain":
                assert room.hub.broadcast(msg)
                takers = list(clients)
            elif kind == "exclude":
                skip = rng.choice(list(clients))
                assert room.hub.broadcast(msg, exclude=by_key[skip])
                takers = [k for k in clients if k != skip]
            else:
                chosen = set(rng.sample(list(clients), 2))
                assert room.hub.broadcast(msg, where=lambda ws, key, chosen=chosen: key in chosen)
                takers = [k for k in clients if k in chosen]
            for k in takers:
                expected[k].append(msg)
    for key, client in clients.items():
        assert recv_n(client, len(expected[key])) == expected[key], key
    st = room.hub.stats()
    assert st["deliveries"] == sum(len(v) for v in expected.values())
    assert (st["fanned_out"], st["member_drops"]) == (160, 0)
    for c in clients.values():
        c.close()
    room.stop()


def test_a_partly_sent_run_counts_its_messages_exactly_and_all_arrive_once(serve: Any) -> None:
    # A member whose kernel buffer fills mid-run: the rest of the run stays
    # queued, counted as the messages not yet wholly sent; a second batch
    # queues behind it frame by frame (a writer waits); reading slowly, the
    # member gets every message once, in order, and the queue ends empty.
    hub = Hub()
    srv, conns = start(serve, hub, WSConfig(send_buffer=128), SmallSendBuffer)
    sock, rest = stalled_member(srv.port)
    assert wait_until(lambda: hub.count == 1, 5)
    (ws,) = conns
    size = 2000
    msgs = [f"{i} ".ljust(size, "z") for i in range(70)]
    ends = []
    total = 0
    for m in msgs:
        total += len(prepare(m).frame)
        ends.append(total)

    def check_depth(queued: int) -> None:
        # Read together, without a switch in between: one consistent state.
        sent = ends[queued - 1] - ws._out_bytes
        assert ws._out_bytes == sum(len(chunk) for chunk in ws._out)
        assert ws.send_queue_depth == sum(1 for e in ends[:queued] if e > sent)

    for m in msgs[:50]:  # one batch, queued as one run
        assert hub.broadcast(m)
    assert wait_until(lambda: hub.stats()["deliveries"] == 50, 5)
    check_depth(50)
    assert 0 < ws._out_bytes < ends[49] and 0 < ws.send_queue_depth <= 50
    for m in msgs[50:]:  # the next batch, while the first one is stuck
        assert hub.broadcast(m)
    assert wait_until(lambda: hub.stats()["deliveries"] == 70, 5)
    check_depth(70)
    # Reads in small pieces; the server's 4 KiB send buffer still cuts the
    # run's rest into many partial sends (a 4 KiB receive buffer would only
    # add TCP's zero-window delays to the test's time).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    r = wsraw.Reader(sock, rest)
    got = []
    with gevent.Timeout(20):
        while len(got) < 70:
            f = r.next(10)
            assert f is not None
            got.append(f[1].decode())
            if len(got) % 10 == 0:
                check_depth(70)
                gevent.sleep(0.001)  # a slow reader: the writer sends in pieces
    assert got == msgs
    assert wait_until(lambda: ws.send_queue_depth == 0 and not ws._out, 5)
    assert hub.stats()["member_drops"] == 0
    sock.close()
    hub.stop()


def test_drop_oldest_cuts_queued_runs_at_message_boundaries(serve: Any) -> None:
    # Runs queued behind a partly sent one, then drop-oldest: the messages
    # dropped are exactly the oldest not in flight, counted one by one, and
    # the connection keeps the newest send_buffer - 1 (as without runs).
    results: list[int] = []
    depths: list[int] = []
    done = gevent.event.Event()

    def handler(ws: gstream.WebSocket) -> None:
        gevent.sleep(0.05)  # let the client shrink its buffer
        pms = [prepare(f"{i} " + "y" * 4000) for i in range(300)]
        for i in range(0, 100, 10):  # messages 0-99 in ten runs, queued before any send
            assert ws.push_shared_run(prepare_run(pms[i:i + 10]), ws.send_queue_depth)
        depths.append(ws.send_queue_depth)
        ws.flush()  # the kernel takes a part; the rest waits for the peer
        for pm in pms[100:]:
            results.append(ws.send_prepared_drop_oldest(pm))
            depths.append(ws.send_queue_depth)
            assert ws._out_bytes == sum(len(chunk) for chunk in ws._out)
        done.set()
        ws.wait_closed(10)

    srv = serve(websocket_app(handler, WSConfig(send_buffer=4)), handler_class=SmallSendBuffer)
    sock, rest = stalled_member(srv.port)
    assert done.wait(5)
    # Nothing runs between the calls (no switch): each leaves exactly send_buffer
    # queued, the first by dropping all but 3 of the runs' unsent messages.
    assert depths[0] == 100 and depths[1:] == [4] * 200
    assert results[0] > 80 and results[1:] == [1] * 199
    dropped = sum(results)
    seqs, code = read_data_frames(sock, rest, 299)
    assert code is None
    assert len(seqs) + dropped == 300 and seqs == sorted(set(seqs))
    assert seqs[-3:] == [297, 298, 299]
    sock.close()


def test_queueing_a_run_allocates_nothing_the_collector_tracks(serve: Any) -> None:
    # One run is shared by every member: queueing it must not allocate a
    # tracked object per member (docs/performance.md, third round).
    room = Room(serve, config=WSConfig(send_buffer=1000))
    (client,) = room.join(1)
    (ws,) = room.conns
    run = prepare_run([prepare(f"g{i}") for i in range(4)])
    gc.disable()
    try:
        before = gc.get_count()[0]
        for _ in range(200):
            assert ws.push_shared_run(run, ws.send_queue_depth)
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert ws.send_queue_depth == 800
    ws.flush()
    assert grown < 50, grown
    assert recv_n(client, 800) == [f"g{i % 4}" for i in range(800)]
    client.close()
    room.stop()
