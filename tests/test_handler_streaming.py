"""GStreamHandler's streaming path: buffers released while a stream runs,
keep-alive and pipelining still correct, request bodies still readable."""

from __future__ import annotations

import gc
import socket
import sys
from typing import Any

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from gstream.broker import SSEBroker
from gstream.handler import GStreamHandler
from gstream.server import Server
from tests.helpers import ChunkedReader, raw_http, read_responses, response_bodies, wait_until


def _streaming_app(seen: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    def app(environ, start_response):  # type: ignore[no-untyped-def]
        handler = start_response.__self__  # the handler serving this request
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():  # type: ignore[no-untyped-def]
            yield b"first;"
            # The first chunk is out: what the handler holds now is what an
            # idle stream would hold for its whole life.
            seen.append({
                "rfile_closed": handler.rfile.closed,
                "has_own_headers": "headers" in handler.__dict__,
                "body": environ["wsgi.input"].read(),
            })
            yield b"second"

        return body()

    return app


class _Responses:
    """Read consecutive chunked responses from one connection (keeps leftovers)."""

    def __init__(self, sock) -> None:  # type: ignore[no-untyped-def]
        self.sock = sock
        self.buf = b""

    def body(self) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "connection closed before a response head"
            self.buf += data
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding: chunked" in head.lower()
        reader = ChunkedReader(self.sock, rest)
        parts = []
        while (chunk := reader.read_chunk()) is not None:
            parts.append(chunk)
        assert reader.done
        # ChunkedReader keeps the terminator's tail in buf; drop "0\r\n\r\n".
        self.buf = reader.buf.partition(b"0\r\n\r\n")[2]
        return b"".join(parts)


def test_stream_releases_reader_and_keep_alive_still_works(serve) -> None:  # type: ignore[no-untyped-def]
    seen: list[dict[str, object]] = []
    srv = serve(_streaming_app(seen), WSGIServer, handler_class=GStreamHandler)
    with raw_http(srv.port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n") as s, gevent.Timeout(5):
        responses = _Responses(s)
        assert responses.body() == b"first;second"
        # Same connection, second request: a fresh reader was made.
        s.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert responses.body() == b"first;second"
    assert [d["rfile_closed"] for d in seen] == [True, True]
    assert [d["has_own_headers"] for d in seen] == [False, False]


def test_pipelined_request_is_not_lost(serve) -> None:  # type: ignore[no-untyped-def]
    seen: list[dict[str, object]] = []
    srv = serve(_streaming_app(seen), WSGIServer, handler_class=GStreamHandler)
    two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    with raw_http(srv.port, two) as s, gevent.Timeout(5):
        responses = _Responses(s)
        assert responses.body() == b"first;second"
        assert responses.body() == b"first;second"
    # The first stream kept its reader: the second request was in it.
    assert seen[0]["rfile_closed"] is False


def test_request_body_stays_readable_during_stream(serve) -> None:  # type: ignore[no-untyped-def]
    seen: list[dict[str, object]] = []
    srv = serve(_streaming_app(seen), WSGIServer, handler_class=GStreamHandler)
    req = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    with raw_http(srv.port, req) as s, gevent.Timeout(5):
        assert _Responses(s).body() == b"first;second"
    assert seen == [{"rfile_closed": False, "has_own_headers": True, "body": b"hello"}]


def test_head_and_first_chunk_in_one_segment(serve) -> None:  # type: ignore[no-untyped-def]
    """The response head and the first chunk arrive together (one send)."""
    def app(environ, start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():  # type: ignore[no-untyped-def]
            yield b"now"
            gevent.sleep(0.3)  # nothing else is sent for a while
            yield b"later"

        return body()

    srv = serve(app, WSGIServer, handler_class=GStreamHandler)
    with raw_http(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") as s, gevent.Timeout(5):
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        gevent.sleep(0.05)  # let anything sent separately arrive
        s.settimeout(0.1)
        try:
            data += s.recv(65536)
        except TimeoutError:
            pass
        assert data.endswith(b"\r\n\r\n3\r\nnow\r\n")


@pytest.mark.skipif(sys.implementation.name != "cpython" or sys.version_info < (3, 11),
                    reason="inline instance attributes are a CPython 3.11+ layout")
def test_handlers_keep_inline_attributes_under_a_connection_burst() -> None:
    """Each handler object stays a few hundred bytes: no per-instance dict.

    Handlers created in a burst, after a connection that closed without a
    request (pywsgi then touches that handler's __dict__), must not fall
    back to a full dict each (~1.3 KiB per connection).
    """
    broker = SSEBroker(heartbeat_interval=None)

    def app(environ: Any, start_response: Any) -> Any:
        # A plain generator around the stream: not detachable
        # (gstream.detached), so each handler stays with its greenlet.
        body = broker.subscribe(environ, start_response)
        try:
            yield from body
        finally:
            body.close()

    srv = Server(app, "127.0.0.1", 0)
    srv.start()
    socks = []
    try:
        socket.create_connection(("127.0.0.1", srv.port)).close()
        gevent.sleep(0.05)
        for _ in range(30):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        assert wait_until(lambda: broker.subscriber_count == 30, 5)
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        # type(), not isinstance(): lazy proxies elsewhere in the process
        # (Django's) would evaluate themselves on __class__.
        handlers = [o for o in gc.get_objects()
                    if issubclass(type(o), GStreamHandler) and o.server is srv._wsgi]
        assert len(handlers) == 30
        # With inline attributes the first referent is an attribute value;
        # a materialized instance dict shows up as a dict.
        assert [type(gc.get_referents(h)[0]) for h in handlers].count(dict) == 0
    finally:
        for s in socks:
            s.close()
        srv.stop(timeout=2)


def test_open_websocket_keeps_no_parsed_handshake(serve) -> None:  # type: ignore[no-untyped-def]
    """Neither the handler's parsed headers nor websockets' Request object
    outlive the handshake of an open connection (they cost ~2.5 KiB each)."""
    from websockets.http11 import Request

    from gstream.websocket import websocket_app
    from tests import wsraw

    def echo(ws):  # type: ignore[no-untyped-def]
        for m in ws:
            ws.send(m)

    srv = serve(websocket_app(echo), WSGIServer, handler_class=GStreamHandler)
    sock, status, _, _ = wsraw.handshake(srv.port, "/")
    assert status == 101
    try:
        with gevent.Timeout(5):
            sock.sendall(wsraw.text("ping"))
            assert sock.recv(100) == b"\x81\x04ping"
        gc.collect()
        assert [o for o in gc.get_objects() if type(o) is Request] == []
        handlers = [o for o in gc.get_objects() if issubclass(type(o), GStreamHandler)
                    and getattr(o, "server", None) is srv.server]
        assert handlers and all("headers" not in vars(h) for h in handlers)
    finally:
        sock.close()


@pytest.mark.parametrize("server", ["pywsgi", "gstream"])
def test_keepalive_client_with_requests_ready_does_not_starve_others(serve, gserver, server) -> None:  # type: ignore[no-untyped-def]
    # Client A pipelines 100 requests; while its first is being served, client
    # B's request arrives. A greenlet only yields when a read would block, and
    # A's are all buffered: without a pass through the loop between requests,
    # B waits for all 100 of A's.
    order: list[str] = []
    clients: dict[str, socket.socket] = {}

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        path = environ["PATH_INFO"]
        order.append(path)
        if path == "/a1":
            clients["b"].sendall(b"GET /b1 HTTP/1.1\r\nHost: x\r\n\r\n")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    if server == "pywsgi":
        port = serve(app, WSGIServer, handler_class=GStreamHandler).port
    else:
        port = gserver(app).port
    n = 100
    with gevent.Timeout(10):
        for name in ("a", "b"):
            # One request each first: both handlers now wait between keep-alive requests.
            clients[name] = raw_http(port, b"GET /%s0 HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
            read_responses(clients[name], 1)
        order.clear()
        clients["a"].sendall(b"".join(b"GET /a%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                                      for i in range(1, n + 1)))
        assert response_bodies(read_responses(clients["a"], n)) == [b"ok"] * n
        assert response_bodies(read_responses(clients["b"], 1)) == [b"ok"]
    for s in clients.values():
        s.close()
    assert len(order) == n + 1
    assert order.index("/b1") <= 3, order[:10]

