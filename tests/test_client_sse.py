"""gstream.client.sse.SSEClient against real gstream SSE endpoints on pywsgi."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import gevent
import pytest

from gstream.client import SSEClient, SSEError
from gstream.errors import Closed
from gstream.events import Event
from gstream.sse import SSE_HEADERS, SSEWriter, last_event_id, stream_events
from tests.tlsutil import client_context, make_cert


class App:
    """One WSGI app with several event-stream behaviours, recording requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float]] = []  # (path, Last-Event-ID, time)
        self.flaky_left = 1

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        self.requests.append((path, environ.get("HTTP_LAST_EVENT_ID", ""), time.monotonic()))
        if path == "/events":  # three events per connection, then the server ends the stream
            sse = SSEWriter(environ, start_response)
            start = int(last_event_id(environ) or 0)
            sse.set_retry(50)
            for n in range(start + 1, start + 4):
                sse.send(Event(data=f"event {n}", name="tick", id=str(n)))
            return sse.close()
        if path == "/iter":  # iterator form, multi-line data, comments
            start_response("200 OK", SSE_HEADERS)
            return stream_events([Event(data="a\nb"), b": a comment\n\n", "plain",
                                  Event(data="x", retry=50)])
        if path == "/length":  # not chunked: Content-Length framing
            body = b"retry: 50\ndata: one\nid: 1\n\ndata: two\n\n"
            start_response("200 OK", [("Content-Type", "text/event-stream"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/nocontent":
            start_response("204 No Content", [])
            return []
        if path == "/html":
            start_response("200 OK", [("Content-Type", "text/html")])
            return [b"<p>hi"]
        if path == "/old":
            start_response("307 Temporary Redirect", [("Location", "/events"),
                                                      ("Content-Length", "0")])
            return []
        if path == "/flaky":
            if self.flaky_left:
                self.flaky_left -= 1
                start_response("503 Service Unavailable", [("Retry-After", "0"),
                                                           ("Content-Length", "0")])
                return []
            start_response("200 OK", SSE_HEADERS)
            return [b"data: recovered\n\n"]
        if path == "/hold":
            sse = SSEWriter(environ, start_response)
            sse.write_data("first")
            try:
                for _ in range(200):
                    gevent.sleep(0.05)
                    sse.write_comment("hb")
            except Closed:
                pass
            return sse.close()
        if path == "/longline":
            start_response("200 OK", SSE_HEADERS)
            return [b"data: " + b"x" * 5000]
        if path == "/greedy":  # asks for an absurd retry, then ends
            start_response("200 OK", SSE_HEADERS)
            return [b"retry: 999999999\ndata: hi\n\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"nope"]


@pytest.fixture
def app() -> App:
    return App()


def take(client: SSEClient, n: int, timeout: float = 5.0) -> list[Any]:
    out = []
    with gevent.Timeout(timeout):
        for ev in client:
            out.append(ev)
            if len(out) == n:
                break
    return out


def test_parse_and_resume_with_last_event_id(serve: Any, app: App) -> None:
    srv = serve(app)
    opened: list[int] = []
    seen: list[str] = []
    client = SSEClient(srv.url + "/events", on_open=lambda c: opened.append(c.connects),
                       on_event=lambda c, e: seen.append(e.data))
    events = take(client, 9)
    client.close()
    assert [e.data for e in events] == [f"event {n}" for n in range(1, 10)]
    assert all(e.event == "tick" for e in events)
    assert [e.last_event_id for e in events] == [str(n) for n in range(1, 10)]
    # Three connections; the 2nd and 3rd resumed from the last id seen.
    assert [r[1] for r in app.requests] == ["", "3", "6"]
    assert client.reconnects == 2 and client.connects == 3 and opened == [1, 2, 3]
    assert client.events_received == 9 and seen == [e.data for e in events]
    assert client.bytes_received > 100 and client.retry_ms == 50


def test_initial_last_event_id_and_headers(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/events", last_event_id="41", headers={"X-A": "b"})
    assert [e.data for e in take(client, 1)] == ["event 42"]
    client.close()
    with pytest.raises(ValueError):
        SSEClient(srv.url + "/events", headers={"X-A": "b\r\nEvil: 1"})
    with pytest.raises(ValueError):
        SSEClient("ftp://127.0.0.1/")


def test_iterator_stream_and_non_chunked_body(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/iter", reconnect=False)
    with gevent.Timeout(5):
        got = [(e.event, e.data) for e in client]
    assert got == [("message", "a\nb"), ("message", "plain"), ("message", "x")]
    assert client.closed
    client = SSEClient(srv.url + "/length", reconnect=False)
    with gevent.Timeout(5):
        got2 = [(e.data, e.last_event_id) for e in client]
    assert got2 == [("one", "1"), ("two", "1")]


def test_retry_is_honoured(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/events", retry_default_ms=5000)
    take(client, 4)  # needs one reconnect after retry: 50
    client.close()
    gap = app.requests[1][2] - app.requests[0][2]
    assert 0.04 <= gap < 1.0, gap


def test_hostile_retry_is_capped(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/greedy", max_retry_ms=100, max_reconnects=1)
    with gevent.Timeout(3):
        assert [e.data for e in client] == ["hi", "hi"]
    assert client.reconnects == 1


def test_204_stops_and_errors_are_clear(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/nocontent")
    with gevent.Timeout(5):
        assert list(client) == []
    assert client.closed and len(app.requests) == 1
    with pytest.raises(SSEError) as info, gevent.Timeout(5):
        list(SSEClient(srv.url + "/missing"))
    assert info.value.status == 404
    with pytest.raises(SSEError, match="Content-Type"), gevent.Timeout(5):
        list(SSEClient(srv.url + "/html"))
    with pytest.raises(SSEError, match="longer than"), gevent.Timeout(5):
        list(SSEClient(srv.url + "/longline", max_line=1000))


def test_redirect_is_followed(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/old")
    assert [e.data for e in take(client, 1)] == ["event 1"]
    client.close()


def test_5xx_and_connection_errors_reconnect(serve: Any, app: App) -> None:
    srv = serve(app)
    errors: list[BaseException] = []
    client = SSEClient(srv.url + "/flaky", on_error=lambda c, e: errors.append(e))
    assert [e.data for e in take(client, 1)] == ["recovered"]
    client.close()
    assert len(errors) == 1 and "503" in str(errors[0])
    # Nothing listens: with a reconnect budget the last error is raised.
    port = srv.port
    srv.stop()
    client = SSEClient(f"http://127.0.0.1:{port}/events", retry_default_ms=10, max_reconnects=2)
    with pytest.raises(OSError), gevent.Timeout(5):
        list(client)
    assert client.reconnects == 2


def test_close_from_another_greenlet_is_prompt(serve: Any, app: App) -> None:
    srv = serve(app)
    client = SSEClient(srv.url + "/hold")
    got: list[str] = []

    def reader() -> None:
        for ev in client:
            got.append(ev.data)

    g = gevent.spawn(reader)
    with gevent.Timeout(5):
        while not got:
            gevent.sleep(0.01)
    t0 = time.monotonic()
    client.close()
    g.join(timeout=2)
    assert g.dead and g.successful() and time.monotonic() - t0 < 0.5
    assert got == ["first"] and client.closed
    # Closing during the reconnect wait is prompt too.
    client = SSEClient(srv.url + "/events", retry_default_ms=10_000)
    take(client, 3)
    g = gevent.spawn(lambda: list(client))
    gevent.sleep(0.1)
    t0 = time.monotonic()
    client.close()
    g.join(timeout=2)
    assert g.dead and time.monotonic() - t0 < 0.5


def test_https(serve: Any, app: App, tmp_path: Any) -> None:
    cert, key = make_cert(str(tmp_path))
    srv = serve(app, certfile=cert, keyfile=key)
    url = f"https://127.0.0.1:{srv.port}/events"
    client = SSEClient(url, ssl_context=client_context(cert))
    assert [e.data for e in take(client, 4)] == [f"event {n}" for n in range(1, 5)]
    client.close()
    # Default context: the self-signed certificate is rejected.
    with pytest.raises(OSError), gevent.Timeout(5):
        list(SSEClient(url, reconnect=False))
