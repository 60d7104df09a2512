"""SSEBroker over a real gevent.pywsgi server on 127.0.0.1, read by raw-socket
clients (tests.helpers.SSEStream) and requests. Ports the seed's broker
checklist (behaviors.md section 7, items 49-79) and the section 9 fixes."""

import json
import socket
import time
from urllib.parse import quote

import gevent
import pytest
import requests
from gevent.monkey import get_original

from gstream import BrokerClosed, Event
from gstream.broker import EVICTED_EVENT, MISSED_EVENT, SHUTDOWN_EVENT, BrokerConfig, SSEBroker
from gstream.lifecycle import lifecycle
from tests.helpers import (
    SSEStream,
    live_greenlets,
    open_fds,
    raw_http,
    read_response_head,
    wait_until,
)


def start(serve, **cfg):
    broker = SSEBroker(**cfg)
    srv = serve(broker.subscribe)
    return broker, srv


def connect(srv, broker, path="/", headers=None, expect=None):
    """Open a stream and wait until the broker has registered it."""
    before = broker.subscriber_count
    s = SSEStream(srv.port, path, headers)
    assert s.status == 200, s.status
    if expect is None:
        expect = before + 1
    assert wait_until(lambda: broker.subscriber_count >= expect, 3)
    return s


def data_events(events):
    return [e for e in events if e.event == "message"]


# -- configuration (items 49, 50) ------------------------------------------

def test_config_defaults_and_normalisation():
    assert SSEBroker().config.default_buffer == 64  # item 49
    c = SSEBroker(default_buffer=128, max_buffer=512).config  # item 50
    assert (c.default_buffer, c.max_buffer) == (128, 512)
    c = BrokerConfig(default_buffer=0, max_buffer=-1, heartbeat_interval=0, block_timeout=-3)
    assert (c.default_buffer, c.max_buffer, c.heartbeat_interval, c.block_timeout) == (64, 1024, None, 5.0)
    assert BrokerConfig(default_buffer=100, max_buffer=10).default_buffer == 10
    base = BrokerConfig(topic="t", max_subscribers=3)
    b = SSEBroker(base, max_subscribers=5)
    assert (b.config.topic, b.config.max_subscribers, base.max_subscribers) == ("t", 5, 3)


# -- delivery, ordering, coalescing ----------------------------------------

def test_headers_open_comment_and_delivery(serve):
    broker, srv = start(serve, retry=2500)
    s = connect(srv, broker)
    assert s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["cache-control"] == "no-cache" and s.headers["x-accel-buffering"] == "no"
    first = s.reader.read_chunk()  # headers and the opening chunk, before any event
    assert first == b": stream open\n\nretry: 2500\n\n"
    eid = broker.publish(Event(data="hello"))
    ev = s.next_event()
    assert (ev.event, ev.data, ev.last_event_id) == ("message", "hello", eid)
    # Plain messages carry no "event:" line (one encoder, section 9 item 3).
    assert b"event:" not in s.raw
    s.close()


def test_ordering_per_subscriber_and_monotonic_ids(serve):
    broker, srv = start(serve, first_id=1, default_buffer=1024)
    streams = [connect(srv, broker) for _ in range(3)]
    for i in range(300):
        broker.publish(Event(data=str(i)))
    for s in streams:
        evs = s.events(300)
        assert [e.data for e in evs] == [str(i) for i in range(300)]
        assert [e.last_event_id for e in evs] == [str(i) for i in range(1, 301)]
        s.close()


def test_publisher_ids_kept_and_str_publish(serve):
    broker, srv = start(serve)
    s = connect(srv, broker)
    assert broker.publish(Event(data="a", id="custom-7")) == "custom-7"
    assert broker.publish("plain") is not None
    a, b = s.events(2)
    assert (a.data, a.last_event_id) == ("a", "custom-7")
    assert b.data == "plain" and b.last_event_id.isdigit()
    s.close()


def test_queued_events_are_coalesced_into_one_chunk(serve):
    broker, srv = start(serve)
    s = connect(srv, broker)
    assert s.reader.read_chunk().startswith(b": stream open")
    for i in range(10):  # no yield in between: all queued before the reader runs
        broker.publish(Event(data=f"e{i}"))
    chunk = s.reader.read_chunk()
    assert chunk.count(b"data: e") == 10
    s.close()


def test_concurrent_publishers_finish_fast(serve):
    """Item 66: 8 subscribers (buffer 4), 16 greenlets x 200 publishes < 3 s."""
    broker, srv = start(serve)
    streams = [connect(srv, broker, "/?buffer=4") for _ in range(8)]
    t0 = time.monotonic()
    jobs = [gevent.spawn(lambda: [broker.publish(Event(data="x")) for _ in range(200)]) for _ in range(16)]
    gevent.joinall(jobs, timeout=5, raise_error=True)
    assert time.monotonic() - t0 < 3
    assert broker.stats()["published"] == 3200
    for s in streams:
        s.close()


def test_event_filter_applied_before_enqueueing(serve):
    """Items 59 and section 9 item 4: filtered-out events use no buffer slot."""
    broker, srv = start(serve)
    s = connect(srv, broker, "/?event=alert&buffer=2")
    both = connect(srv, broker, "/?event=alert&event=info&buffer=1024")
    broker.publish(Event(data="a1", name="alert"))
    for i in range(100):
        broker.publish(Event(data=str(i), name="info"))
    broker.publish(Event(data="a2", name="alert"))
    evs = s.events(2)
    assert [(e.event, e.data) for e in evs] == [("alert", "a1"), ("alert", "a2")]
    assert broker.subscribers()[0]["dropped"] == 0
    assert len(both.events(102)) == 102
    s.close()
    both.close()


# -- buffer negotiation (items 52, 61, 62) -----------------------------------

@pytest.mark.parametrize("path,headers,expected", [
    ("/?buffer=99999", {}, 32),
    ("/?buffer=16", {}, 16),
    ("/?buffer=1", {}, 1),
    ("/?buffer=abc", {}, 8),
    ("/?buffer=0", {}, 8),
    ("/?buffer=-5", {}, 8),
    ("/?buffer=1e3", {}, 8),
    ("/?buffer=99999999999999999999", {}, 8),
    ("/", {"X-SSE-Buffer": "20"}, 20),
    ("/?buffer=junk", {"X-SSE-Buffer": "20"}, 20),
    ("/", {"X-SSE-Buffer": "\u0661\u0662"}, 8),
])
def test_buffer_clamping(serve, path, headers, expected):
    broker, srv = start(serve, default_buffer=8, max_buffer=32)
    s = connect(srv, broker, path, headers)
    assert broker.subscribers()[0]["buffer"] == expected
    s.close()


# -- subscriber ids (items 63, 64, 68, 69) -----------------------------------

def test_subscriber_id_bounded_on_character_boundary(serve):
    broker, srv = start(serve)
    s1 = connect(srv, broker, "/?subscriber_id=" + "a" * 1024)
    s2 = connect(srv, broker, "/?subscriber_id=" + quote("\u00e9" * 200))
    s3 = connect(srv, broker, "/?subscriber_id=" + quote("ok\r\nX-Evil: 1"))
    ids = sorted((i["subscriber_id"] for i in broker.subscribers()), key=len)
    assert ids[0] == "ok"
    assert "\u00e9" * 128 in ids and "a" * 256 in ids
    for s in (s1, s2, s3):
        s.close()


def test_subscriber_id_from_header_and_generated_ids(serve):
    broker, srv = start(serve)
    s = connect(srv, broker, "/", {"X-Subscriber-ID": "from-header"})
    assert broker.subscribers()[0]["key"] == "from-header"
    s.close()
    assert wait_until(lambda: broker.publish("x") and broker.subscriber_count == 0, 3)
    streams = [connect(srv, broker) for _ in range(20)]
    keys = [i["key"] for i in broker.subscribers()]
    assert len(set(keys)) == 20
    assert all(len(k) == 32 and all(c in "0123456789abcdef" for c in k) for k in keys)
    for s in streams:
        s.close()


def test_id_collision_without_principal_never_evicts(serve):
    broker, srv = start(serve)
    victim = connect(srv, broker, "/?subscriber_id=shared")
    attacker = connect(srv, broker, "/?subscriber_id=shared")
    assert broker.subscriber_count == 2
    keys = {i["key"] for i in broker.subscribers()}
    assert "shared" in keys and len(keys) == 2
    broker.publish("still here")
    assert victim.next_event().data == "still here"
    assert attacker.next_event().data == "still here"
    # The incumbent keeps the original key.
    victim.close()
    assert wait_until(lambda: broker.publish("x") and broker.subscriber_count == 1, 3)
    assert broker.subscribers()[0]["key"] != "shared"
    attacker.close()


def test_eviction_only_within_one_principal(serve):
    """Item 65 and section 9 item 8 (final frame with a retry hint)."""
    broker, srv = start(serve, principal=lambda env: env.get("HTTP_X_USER"), retry=7000)
    alice1 = connect(srv, broker, "/?subscriber_id=tab", {"X-User": "alice"})
    bob = connect(srv, broker, "/?subscriber_id=tab", {"X-User": "bob"})
    anon = connect(srv, broker, "/?subscriber_id=tab")  # no principal: never matches
    assert broker.subscriber_count == 3
    broker.publish("one")
    assert alice1.next_event().data == "one"
    alice2 = connect(srv, broker, "/?subscriber_id=tab", {"X-User": "alice"}, expect=3)
    rest = alice1.read_until_end(3)
    assert [e.event for e in rest] == [EVICTED_EVENT]
    assert b"retry: 7000\n" in alice1.raw
    assert broker.subscriber_count == 3 and broker.stats()["evicted"] == 1
    broker.publish("two")
    assert alice2.next_event().data == "two"
    for s in (bob, anon):
        assert [e.data for e in s.events(2)] == ["one", "two"]
    for s in (alice2, bob, anon, alice1):
        s.close()


def test_principal_hook_failure_is_unknown_caller(serve):
    def boom(env):
        raise RuntimeError("hook broke")

    broker, srv = start(serve, principal=boom)
    a = connect(srv, broker, "/?subscriber_id=x")
    b = connect(srv, broker, "/?subscriber_id=x")
    assert broker.subscriber_count == 2 and broker.stats()["evicted"] == 0
    a.close()
    b.close()


# -- cap (items 70, 71) ------------------------------------------------------

def test_max_subscribers_exact_under_concurrency(serve):
    broker, srv = start(serve, max_subscribers=10, retry_after=9)
    results = []

    def one(i):
        sock = raw_http(srv.port, f"GET /?subscriber_id=c{i % 3} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = read_response_head(sock)
        results.append((status, headers.get("retry-after"), sock))

    gevent.joinall([gevent.spawn(one, i) for i in range(50)], timeout=10, raise_error=True)
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) == 10 and statuses.count(503) == 40
    assert all(r[1] == "9" for r in results if r[0] == 503)
    assert broker.subscriber_count == 10 and broker.stats()["rejected"] == 40
    for r in results:
        r[2].close()


def test_cap_rejects_reused_id_without_principal_and_allows_replacement(serve):
    broker, srv = start(serve, max_subscribers=1, principal=lambda env: env.get("HTTP_X_USER"))
    a = connect(srv, broker, "/?subscriber_id=a", {"X-User": "u"})
    for path, hdrs in (("/?subscriber_id=a", {}), ("/?subscriber_id=b", {"X-User": "u"}), ("/", {})):
        r = requests.get(srv.url + path, headers=hdrs, timeout=5)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.text == "too many subscribers\n"
    assert broker.subscriber_count == 1
    a2 = connect(srv, broker, "/?subscriber_id=a", {"X-User": "u"}, expect=1)  # replacement
    assert a.read_until_end(3)[-1].event == EVICTED_EVENT
    assert broker.subscriber_count == 1
    a.close()
    a2.close()


# -- heartbeats (items 67, 72) -----------------------------------------------

def test_heartbeat_on_idle_stream_and_reset_by_writes(serve):
    broker, srv = start(serve, heartbeat_interval=0.3)
    s = connect(srv, broker)
    s.reader.read_chunk()
    gevent.sleep(0.75)
    chunks = [s.reader.read_chunk(), s.reader.read_chunk()]
    assert chunks == [b": heartbeat\n\n"] * 2
    # Busy stream: the idle timer restarts after every write, so no heartbeat.
    busy = connect(srv, broker)
    busy.reader.read_chunk()
    for _ in range(12):
        broker.publish("tick")
        gevent.sleep(0.03)
    assert len(busy.events(12)) == 12
    assert b"heartbeat" not in busy.raw
    s.close()
    busy.close()


def test_heartbeat_reclaims_dead_subscriber_seat(serve):
    broker, srv = start(serve, heartbeat_interval=0.05, max_subscribers=1)
    s = connect(srv, broker)
    s.close()  # the server only learns it when a write fails
    assert wait_until(lambda: broker.subscriber_count == 0, 3)
    s2 = connect(srv, broker)
    s2.close()


def test_heartbeats_can_be_disabled(serve):
    broker, srv = start(serve, heartbeat_interval=None, retry=0)
    s = connect(srv, broker)
    assert s.reader.read_chunk() == b": stream open\n\n"
    with pytest.raises(gevent.Timeout):
        s.next_event(timeout=0.3)
    s.close()


# -- method, close, shutdown -------------------------------------------------

def test_post_is_405_and_head_does_not_register(serve):
    broker, srv = start(serve)
    r = requests.post(srv.url + "/", timeout=5)
    assert r.status_code == 405 and r.headers["Allow"] == "GET"
    r = requests.head(srv.url + "/", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    assert broker.subscriber_count == 0


def test_close_sends_done_ends_streams_and_refuses_more(serve):
    broker, srv = start(serve)
    streams = [connect(srv, broker) for _ in range(3)]
    broker.publish("last")
    broker.close()
    broker.close()  # idempotent
    for s in streams:
        evs = s.read_until_end(3)
        assert [(e.event, e.data) for e in evs] == [("message", "last"), ("done", "[DONE]")]
        s.close()
    assert broker.subscriber_count == 0 and broker.closed
    with pytest.raises(BrokerClosed):
        broker.publish("nope")
    r = requests.get(srv.url + "/", timeout=5)
    assert r.status_code == 503 and r.text == "broker closed\n"


def test_lifecycle_shutdown_ends_streams_with_retry_hint(serve):
    broker, srv = start(serve, retry=4000)
    s = connect(srv, broker)
    try:
        assert lifecycle.shutdown_all(timeout=3, reason="deploy") == 0
        evs = s.read_until_end(3)
        assert [(e.event, e.data) for e in evs] == [(SHUTDOWN_EVENT, "deploy")]
        assert s.raw.endswith(b"event: gstream.shutdown\nretry: 4000\ndata: deploy\n\n")
        r = requests.get(srv.url + "/", timeout=5)
        assert r.status_code == 503 and "Retry-After" in r.headers
    finally:
        lifecycle.reset()
    s.close()


# -- native threads ----------------------------------------------------------

def test_publish_from_a_native_os_thread(serve):
    broker, srv = start(serve, first_id=1)
    s = connect(srv, broker, "/?buffer=1024")  # the thread may outpace the reader
    start_new_thread = get_original("_thread", "start_new_thread")
    get_ident = get_original("_thread", "get_ident")
    sleep = get_original("time", "sleep")
    done = []

    def worker():
        done.append(get_ident())
        for i in range(200):
            assert broker.publish(Event(data=str(i))) is None
            if i % 50 == 0:
                sleep(0.001)
        done.append("ok")

    start_new_thread(worker, ())
    evs = s.events(200, timeout=5)
    assert done[0] != get_ident() and done[-1] == "ok"
    assert [e.data for e in evs] == [str(i) for i in range(200)]
    assert [e.last_event_id for e in evs] == [str(i) for i in range(1, 201)]
    assert broker.stats()["foreign"] == 200
    assert wait_until(lambda: broker._pump is None, 2)
    s.close()


# -- leaks -------------------------------------------------------------------

def test_no_leak_after_2000_connect_disconnect_cycles(serve):
    broker, srv = start(serve, heartbeat_interval=0.05)
    warm = connect(srv, broker)
    warm.close()
    assert wait_until(lambda: broker.subscriber_count == 0, 3)
    gevent.sleep(0.1)
    base_greenlets, base_fds, base_life = live_greenlets(), open_fds(), len(lifecycle)

    def cycle(n):
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /?buffer=4 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = read_response_head(s)
            assert status == 200
            s.close()

    with gevent.Timeout(40):
        gevent.joinall([gevent.spawn(cycle, 100) for _ in range(20)], raise_error=True)
    assert broker.stats()["rejected"] == 0
    assert wait_until(lambda: broker.subscriber_count == 0, 10), broker.subscriber_count
    assert wait_until(lambda: open_fds() <= base_fds + 2, 5), (open_fds(), base_fds)
    assert wait_until(lambda: live_greenlets() <= base_greenlets + 2, 5)
    assert len(lifecycle) <= base_life and not broker._subs


def test_stats_and_missed_event_shape(serve):
    broker, srv = start(serve)
    s = connect(srv, broker, "/?buffer=2&subscriber_id=me")
    for i in range(5):
        broker.publish(str(i))
    info = broker.subscribers()[0]
    assert (info["subscriber_id"], info["depth"], info["dropped"], info["mode"]) == ("me", 2, 3, "drop-oldest")
    evs = s.events(3)
    assert evs[0].event == MISSED_EVENT and json.loads(evs[0].data) == {"missed": 3}
    assert [e.data for e in evs[1:]] == ["3", "4"]
    st = broker.stats()
    assert (st["published"], st["dropped"], st["delivered"], st["subscribers"]) == (5, 3, 2, 1)
    s.close()


def test_publish_from_gevent_threadpool_and_after_close(serve):
    from gevent.threadpool import ThreadPool

    broker, srv = start(serve)
    s = connect(srv, broker, "/?buffer=1024")
    pool = ThreadPool(2)
    try:
        results = [pool.spawn(broker.publish, Event(data=str(i))) for i in range(20)]
        assert [r.get(timeout=5) for r in results] == [None] * 20
        assert sorted(int(e.data) for e in s.events(20)) == list(range(20))
        broker.close()
        with pytest.raises(BrokerClosed):
            pool.spawn(broker.publish, Event(data="late")).get(timeout=5)
    finally:
        pool.kill()
        s.close()
