"""Last-Event-ID replay: the History window alone (pure), and reconnecting
clients over real sockets with no gap and no duplicate."""

import json

import gevent
import pytest

from gstream import Event
from gstream.broker import RESET_EVENT, SSEBroker
from gstream.replay import History
from tests.helpers import SSEStream, wait_until


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_history_window_by_count_and_age():
    clock = Clock()
    h = History(3, 10, clock=clock)
    for seq in range(1, 6):
        h.append(seq, str(seq), "message", f"f{seq}".encode())
    assert len(h) == 3 and h.last_id == "5"
    assert h.since("3").frames == [b"f4", b"f5"]
    assert h.since("5") == ("ok", [])
    assert h.since("2").status == "expired"
    assert h.since("nope").status == "unknown"
    assert h.since("").status == "fresh"
    clock.t = 11
    assert h.since("4").status == "expired" and len(h) == 0
    assert h.since("5") == ("ok", [])  # latest id: nothing missed even if expired


def test_history_filter_disabled_and_hostile_ids():
    h = History(10, None)
    for seq, name in enumerate(["a", "b", "a", "c"], start=1):
        h.append(seq, f"id{seq}", name, name.encode())
    assert h.since("id1", {"a", "c"}.__contains__).frames == [b"a", b"c"]
    for hostile in ("9" * 1000, "-1", "1e9", "id1\x00", "\u00e9", "99999999999999999999"):
        assert h.since(hostile).status == "unknown"
    off = History(0, None)
    off.append(1, "1", "m", b"x")
    assert len(off) == 0 and off.since("1") == ("ok", []) and off.since("0").status == "unknown"


def test_publisher_ids_reused_resolve_to_latest():
    h = History(10, None)
    h.append(1, "same", "m", b"1")
    h.append(2, "same", "m", b"2")
    h.append(3, "other", "m", b"3")
    assert h.since("same").frames == [b"3"]


def start(serve, **cfg):
    cfg.setdefault("first_id", 1)
    broker = SSEBroker(**cfg)
    return broker, serve(broker.subscribe)


def test_replay_after_reconnect_no_gap_no_duplicate(serve):
    broker, srv = start(serve, history_size=100)
    s = SSEStream(srv.port, "/")
    assert wait_until(lambda: broker.subscriber_count == 1, 3)
    for i in range(5):
        broker.publish(str(i))
    seen = s.events(3)
    s.close()
    for i in range(5, 8):
        broker.publish(str(i))
    s2 = SSEStream(srv.port, "/", {"Last-Event-ID": seen[-1].last_event_id})
    replayed = s2.events(5)
    broker.publish("8")
    assert [e.data for e in replayed + [s2.next_event()]] == [str(i) for i in range(3, 9)]
    assert broker.stats()["replayed"] == 5
    s2.close()


def test_replay_via_query_param_respects_filter(serve):
    broker, srv = start(serve)
    for i in range(6):
        broker.publish(Event(data=str(i), name="a" if i % 2 else "b"))
    s = SSEStream(srv.port, "/?event=a&last_event_id=1")
    assert [(e.event, e.data) for e in s.events(3)] == [("a", "1"), ("a", "3"), ("a", "5")]
    s.close()


def test_continuous_publishing_across_many_reconnects(serve):
    """A publisher never pauses while the client drops and resumes 10 times:
    the concatenation of everything received is exactly 0..N-1."""
    broker, srv = start(serve, history_size=5000)
    running = [True]

    def publisher():
        i = 0
        while running[0] and i < 5000:
            broker.publish(str(i))
            i += 1
            gevent.sleep(0.0005)

    got, last = [], ""
    g = gevent.spawn(publisher)
    try:
        for _ in range(10):
            s = SSEStream(srv.port, "/", {"Last-Event-ID": last} if last else None)
            for ev in s.events(20, timeout=5):
                got.append(int(ev.data))
                last = ev.last_event_id
            s.close()
    finally:
        running[0] = False
        g.join(timeout=5)
    assert got == list(range(got[0], got[0] + len(got)))
    assert got[0] == 0 or broker.stats()["resets"] == 0


def test_reset_when_id_fell_out_of_history(serve):
    broker, srv = start(serve, history_size=5)
    ids = [broker.publish(str(i)) for i in range(20)]
    s = SSEStream(srv.port, "/", {"Last-Event-ID": ids[2]})
    ev = s.next_event()
    assert ev.event == RESET_EVENT
    body = json.loads(ev.data)
    assert body == {"last_event_id": ids[2], "reason": "expired", "latest_id": ids[-1]}
    # The reset carries the latest id, so the next resume starts from here.
    assert ev.last_event_id == ids[-1]
    broker.publish("next")
    nxt = s.next_event()
    assert nxt.data == "next"
    s.close()
    assert broker.stats()["resets"] == 1


@pytest.mark.parametrize("hostile", ["garbage", "9" * 1000, "99999999999999", "-1", "\u00e9\u00e9"])
def test_unknown_or_hostile_ids_get_reset(serve, hostile):
    broker, srv = start(serve)
    broker.publish("a")
    s = SSEStream(srv.port, "/", {"Last-Event-ID": hostile.encode().decode("latin-1")})
    ev = s.next_event()
    assert ev.event == RESET_EVENT and json.loads(ev.data)["reason"] == "unknown"
    assert len(json.loads(ev.data)["last_event_id"]) <= 256
    s.close()


def test_latest_id_resumes_without_reset(serve):
    broker, srv = start(serve, history_size=0)
    eid = broker.publish("only")
    s = SSEStream(srv.port, "/", {"Last-Event-ID": eid})
    broker.publish("after")
    assert s.next_event().data == "after"
    assert broker.stats()["resets"] == 0
    s.close()


def test_restarted_broker_does_not_reuse_ids(serve):
    """Default ids start from the clock: an old process's ids are unknown,
    never silently mapped onto different events of the new one."""
    old = SSEBroker()
    old_ids = [old.publish(str(i)) for i in range(3)]
    new, srv = start(serve, first_id=None)
    new_ids = [new.publish(str(i)) for i in range(3)]
    assert int(new_ids[0]) > int(old_ids[-1])
    s = SSEStream(srv.port, "/", {"Last-Event-ID": old_ids[0]})
    assert s.next_event().event == RESET_EVENT
    s.close()
    old.close()
