"""Each gstream Server drains its own streams: stopping one server of a process leaves the
streams of another open and accepting, and a Server given a registry of its own drains its
broker streams through it (both were reached through one process-wide registry before)."""

from __future__ import annotations

import contextlib
from typing import Any

import gevent
import requests
from websockets.sync.client import connect as ws_connect

from gstream import SSEBroker, websocket_app, websocket_callback_app
from gstream.lifecycle import Lifecycle, lifecycle
from gstream.sseparse import EventStreamParser
from tests.helpers import close_code_received, wait_until


def _echo(ws: Any) -> None:
    for m in ws:
        ws.send(m)


def _routes(broker: SSEBroker) -> Any:
    ws_app = websocket_app(_echo)
    cb_app = websocket_callback_app(lambda ws: None, lambda ws, m: ws.send(m), in_loop=True)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        if path == "/ws":
            return ws_app(environ, start_response)
        if path == "/cb":
            return cb_app(environ, start_response)
        return broker.subscribe(environ, start_response)

    return app


class _Stream:
    """An SSE stream read through requests, events parsed as they come."""

    def __init__(self, url: str) -> None:
        self.resp = requests.get(url, stream=True, timeout=10)
        self.chunks = self.resp.iter_content(None)
        self.parser = EventStreamParser()
        self.events: list[Any] = []

    def until(self, predicate: Any, timeout: float = 5.0) -> bool:
        with gevent.Timeout(timeout, False):
            while not predicate(self.events):
                self.events.extend(self.parser.feed(next(self.chunks)))
            return True
        return False

    def close(self) -> None:
        self.resp.close()


def test_stopping_one_server_leaves_the_streams_of_another_alone(gserver: Any) -> None:
    a_broker, b_broker = SSEBroker(), SSEBroker()
    a, b = gserver(_routes(a_broker)), gserver(_routes(b_broker))
    a_sse, b_sse = _Stream(a.url + "/"), _Stream(b.url + "/")
    with contextlib.ExitStack() as stack:
        a_ws = stack.enter_context(ws_connect(f"ws://127.0.0.1:{a.port}/ws"))
        b_ws = stack.enter_context(ws_connect(f"ws://127.0.0.1:{b.port}/ws"))
        b_cb = stack.enter_context(ws_connect(f"ws://127.0.0.1:{b.port}/cb"))
        stack.callback(a_sse.close)
        stack.callback(b_sse.close)
        assert wait_until(lambda: len(a.lifecycle) == 2 and len(b.lifecycle) == 3, 5), (
            len(a.lifecycle), len(b.lifecycle))
        # The process-wide registry still holds every live stream (stats count it).
        assert len(lifecycle) >= 5
        assert a.stop(timeout=3)
        # a's streams were ended politely...
        assert a_sse.until(lambda evs: any(e.event == "gstream.shutdown" for e in evs))
        assert close_code_received(a_ws) == 1001
        # ...b's were not touched, and b still takes new ones.
        b_broker.publish("after a stopped")
        assert b_sse.until(lambda evs: any(e.data == "after a stopped" for e in evs))
        assert not any(e.event == "gstream.shutdown" for e in b_sse.events)
        b_ws.send("still")
        assert b_ws.recv(timeout=5) == "still"
        b_cb.send("here")
        assert b_cb.recv(timeout=5) == "here"
        late = _Stream(b.url + "/")
        assert late.resp.status_code == 200
        with ws_connect(f"ws://127.0.0.1:{b.port}/ws") as late_ws:
            late_ws.send("x")
            assert late_ws.recv(timeout=5) == "x"
        # Stopping b ends b's streams, the late one too.
        assert b.stop(timeout=3)
        for s in (b_sse, late):
            assert s.until(lambda evs: any(e.event == "gstream.shutdown" for e in evs))
        assert close_code_received(b_ws) == 1001
        assert close_code_received(b_cb) == 1001
        late.close()


def test_a_server_with_its_own_registry_drains_its_broker_streams(gserver: Any) -> None:
    mine = Lifecycle()
    broker = SSEBroker()
    srv = gserver(_routes(broker), lifecycle=mine)
    stream = _Stream(srv.url + "/")
    try:
        assert wait_until(lambda: len(mine) == 1 and broker.subscriber_count == 1, 5)
        assert srv.stop(timeout=3)
        assert stream.until(lambda evs: any(e.event == "gstream.shutdown" for e in evs))
        assert wait_until(lambda: len(mine) == 0 and broker.subscriber_count == 0, 5)
    finally:
        stream.close()


def test_the_process_wide_registry_still_reaches_every_server_stream(gserver: Any) -> None:
    broker = SSEBroker()
    srv = gserver(_routes(broker))
    stream = _Stream(srv.url + "/")
    try:
        assert wait_until(lambda: len(srv.lifecycle) == 1, 5)
        try:
            assert lifecycle.shutdown_all(timeout=3) == 0  # what gunicorn's workers call
            assert srv.lifecycle.shutting_down  # the parent's state is the server's too
            assert stream.until(lambda evs: any(e.event == "gstream.shutdown" for e in evs))
        finally:
            lifecycle.reset()
        assert not srv.lifecycle.shutting_down
        assert wait_until(lambda: len(srv.lifecycle) == 0, 5)
    finally:
        stream.close()
