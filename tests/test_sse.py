"""SSEWriter, stream_events, ChunkedWriter and last_event_id over a real
gevent.pywsgi server on 127.0.0.1, read by real clients."""

import gevent
import gevent.event
import pytest
import requests

from gstream import (
    SSE_HEADERS,
    ChunkedWriter,
    Closed,
    Event,
    SSEWriter,
    last_event_id,
    stream_events,
)
from tests.helpers import SSEStream, iter_sse, wait_until


def body_of(serve, writes):
    """Serve an app that applies ``writes`` to an SSEWriter; return the raw body."""

    def app(environ, start_response):
        sse = SSEWriter(environ, start_response)
        writes(sse)
        return sse.close()

    srv = serve(app)
    r = requests.get(srv.url + "/", timeout=5)
    return r


def test_write_event_exact(serve):
    r = body_of(serve, lambda s: s.write_event("update", "hello world"))
    assert r.content == b"event: update\ndata: hello world\n\n"
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Accel-Buffering"] == "no"


def test_write_data_comment_message_error_done(serve):
    def writes(s):
        s.write_data("just data")
        s.write_comment("ping")
        s.write_message("hello")
        s.write_error("something broke")
        s.write_done()

    r = body_of(serve, writes)
    assert r.content == (
        b"data: just data\n\n: ping\n\nevent: message\ndata: hello\n\n"
        b"event: error\ndata: something broke\n\nevent: done\ndata: [DONE]\n\n"
    )


def test_set_id_applies_once_and_retry(serve):
    def writes(s):
        s.set_retry(5)
        s.set_retry(0)
        s.set_retry(-100)
        s.set_id("42")
        s.write_data("a")
        s.write_data("b")

    r = body_of(serve, writes)
    assert r.content == b"retry: 5\n\nid: 42\ndata: a\n\ndata: b\n\n"


def test_multiline_data(serve):
    r = body_of(serve, lambda s: s.write_data("line1\nline2\nline3"))
    assert r.content == b"data: line1\ndata: line2\ndata: line3\n\n"


@pytest.mark.parametrize("payload", ["hello\rretry: 0", "hello\nevent: forged", "hello\0id: forged", "line1\r\nline2"])
def test_data_strips_cr_and_nul(serve, payload):
    r = body_of(serve, lambda s: s.write_data(payload))
    assert b"\r" not in r.content and b"\0" not in r.content
    assert b"\nretry:" not in r.content and b"\nevent: forged" not in r.content


def test_event_name_and_comment_injection(serve):
    def writes(s):
        s.write_event("message\nevent: injected", "x")
        s.write_comment("test\r\nSet-Cookie: evil=true")
        s.write_data("normal\nevent: injected\ndata: pwned")
        s.set_id("42\nevent: forged")
        s.write_data("y")
        s.set_id("\nevil")
        s.write_data("z")

    r = body_of(serve, writes)
    lines = r.content.split(b"\n")
    assert sum(1 for line in lines if line.startswith(b"event: ")) == 1
    assert b"event: injected" not in lines
    assert b"Set-Cookie" not in r.content
    assert b"event: forged" not in r.content
    # An id empty after truncation is omitted, never an empty "id:" line.
    assert b"id: \n" not in r.content and b"id: 42\ndata: y" in r.content


def test_each_event_arrives_when_written_not_at_the_end(serve):
    go_on = gevent.event.Event()

    def app(environ, start_response):
        sse = SSEWriter(environ, start_response)
        sse.write_event("step", "1")
        go_on.wait(5)
        sse.write_event("step", "2")
        return sse.close()

    srv = serve(app)
    with requests.get(srv.url + "/", stream=True, timeout=5) as r:
        events = iter_sse(r)
        with gevent.Timeout(3):
            first = next(events)
        assert (first.event, first.data) == ("step", "1")
        assert not go_on.is_set()  # the first event came before the second was written
        go_on.set()
        with gevent.Timeout(3):
            assert next(events).data == "2"


def test_write_after_close_and_after_disconnect_raise_closed(serve):
    outcome = {}
    left = gevent.event.Event()

    def app(environ, start_response):
        sse = SSEWriter(environ, start_response)
        sse.write_data("hi")
        left.wait(5)
        try:
            with gevent.Timeout(5):
                for _ in range(1000):  # the kernel buffer hides the first few writes
                    sse.write_data("x" * 1000)
                    gevent.sleep(0.001)
        except Closed:
            outcome["closed"] = True
        sse.close()
        try:
            sse.write_data("again")
        except Closed:
            outcome["after_close"] = True
        return []

    srv = serve(app)
    s = SSEStream(srv.port, "/")
    s.next_event()
    s.close()
    left.set()
    assert wait_until(lambda: len(outcome) == 2, 6), outcome


def test_stream_events_iterator_form_and_generator_closed_on_disconnect(serve):
    state = {"closed": False, "sent": 0}

    def gen():
        try:
            for i in range(10_000):
                state["sent"] = i
                yield Event(data=str(i), id=str(i))
                gevent.sleep(0.005)
        finally:
            state["closed"] = True

    def app(environ, start_response):
        start_response("200 OK", SSE_HEADERS)
        return stream_events(gen())

    srv = serve(app)
    s = SSEStream(srv.port, "/")
    assert s.headers["content-type"].startswith("text/event-stream")
    evs = s.events(3)
    assert [e.data for e in evs] == ["0", "1", "2"]
    s.close()
    # The generator must stop soon after the client leaves (no CLOSE_WAIT leak).
    assert wait_until(lambda: state["closed"], 5)
    assert state["sent"] < 2000


def test_open_commits_headers_before_any_event(serve):
    go_on = gevent.event.Event()

    def app(environ, start_response):
        sse = SSEWriter(environ, start_response)
        sse.open()
        go_on.wait(5)
        return sse.close()

    srv = serve(app)
    s = SSEStream(srv.port, "/")  # returns once the head arrived
    assert s.status == 200
    go_on.set()
    s.close()


def test_chunked_writer(serve):
    def app(environ, start_response):
        w = ChunkedWriter(environ, start_response, content_type="text/plain")
        w.write_chunk(b"aaa")
        w.write_chunk(b"")
        w.write_chunk(b"bbb")
        w.close()
        w.close()
        try:
            w.write_chunk(b"ccc")
        except Closed:
            pass
        return []

    srv = serve(app)
    r = requests.get(srv.url, timeout=5)
    assert r.content == b"aaabbb"
    assert r.headers["Transfer-Encoding"] == "chunked"


def test_chunked_writer_chunks_arrive_separately(serve):
    go_on = gevent.event.Event()

    def app(environ, start_response):
        w = ChunkedWriter(environ, start_response)
        w.write_chunk(b"hello")
        go_on.wait(5)
        w.write_chunk(b"world")
        return w.close()

    srv = serve(app)
    with requests.get(srv.url, stream=True, timeout=5) as r:
        it = r.iter_content(chunk_size=None)
        with gevent.Timeout(3):
            assert next(it) == b"hello"
        go_on.set()
        with gevent.Timeout(3):
            assert next(it) == b"world"


def test_chunked_writer_rejects_text():
    with pytest.raises(TypeError):
        ChunkedWriter({}, lambda *a: None).write_chunk("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({"HTTP_LAST_EVENT_ID": "123"}, "123"),
        ({"QUERY_STRING": "last_event_id=456"}, "456"),
        ({"HTTP_LAST_EVENT_ID": "header-id", "QUERY_STRING": "last_event_id=query-id"}, "header-id"),
        ({}, ""),
        ({"HTTP_LAST_EVENT_ID": "42\nevent: forged"}, "42"),
        ({"HTTP_LAST_EVENT_ID": "42\0event: forged"}, "42"),
        ({"QUERY_STRING": "last_event_id=42%0Aevent:%20forged"}, "42"),
        ({"QUERY_STRING": "last_event_id=42%00event:%20forged"}, "42"),
        ({"QUERY_STRING": "a=1&last_event_id=7&last_event_id=8"}, "7"),
        ({"HTTP_LAST_EVENT_ID": "x" * 100_000}, "x" * 1024),
    ],
)
def test_last_event_id(environ, expected):
    assert last_event_id(environ) == expected


def test_last_event_id_over_http(serve):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [last_event_id(environ).encode()]

    srv = serve(app)
    assert requests.get(srv.url, headers={"Last-Event-ID": "event-42"}, timeout=5).text == "event-42"
    assert requests.get(srv.url + "/?last_event_id=event-99", timeout=5).text == "event-99"
