"""Seat holders of every kind, for the connection-cap tests (served by ``gstream serve``).

* ``/sse``: an :class:`~gstream.SSEBroker` subscriber (heartbeat 0.3 s, so a
  departed client's seat frees at the next heartbeat);
* ``/idle``: a subscriber of a broker with a 2 s heartbeat (for 10,000 at once);
* ``/chunked``: a :class:`~gstream.ChunkedWriter` stream, ``start`` then a
  ``tick`` every 0.3 s;
* ``/ws``: a WebSocket served by a greenlet: ``hello`` then ``tick`` every 0.3 s;
* ``/wscb``: a WebSocket served by callbacks (detached, no greenlet): ``hello``;
* ``/poke?m=X``: sends ``X`` to every open stream of every kind;
* ``/detached``: how many streams are served without a greenlet (gstream.detached);
* ``/slow?t=S``: answers after S seconds; ``/``: answers ``ok`` (keep-alive);
* ``/hog?n=N&t=S``: holds N more open descriptors for S seconds.

Nothing here keeps the event loop alive by itself (the tick timer is unref'd,
streams wait on events), as in an application that only serves streams:
whether the process stays up is the server's business.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event

from gstream import ChunkedWriter, Hub, SSEBroker, websocket_app, websocket_callback_app
from gstream.detached import detached_streams
from gstream.errors import Closed

broker = SSEBroker(topic="cap", heartbeat_interval=0.3)
idle_broker = SSEBroker(topic="idle", heartbeat_interval=2.0)
hub = Hub()
hub.start()
# Woken on every tick and poke; replaced each time (waiters hold the old one).
_wake = gevent.event.Event()
_pokes: list[str] = []


def _bump() -> None:
    global _wake
    wake, _wake = _wake, gevent.event.Event()
    wake.set()


_ticker = gevent.get_hub().loop.timer(0.3, 0.3, ref=False)
_ticker.start(_bump)


def _next_message(seen: int) -> tuple[str, int]:
    """Wait for the next tick or poke; return what to send and the pokes seen."""
    _wake.wait()
    if len(_pokes) > seen:
        return _pokes[-1], len(_pokes)
    return "tick", seen


def _chunked(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    out = ChunkedWriter(environ, start_response, content_type="text/plain")
    seen = len(_pokes)
    try:
        out.write_chunk(b"start\n")
        while True:
            message, seen = _next_message(seen)
            out.write_chunk(message.encode() + b"\n")
    except Closed:
        pass
    return out.close()


def _ws_handler(ws: Any) -> None:
    seen = len(_pokes)
    ws.send("hello")
    while not ws.closed:
        message, seen = _next_message(seen)
        ws.send(message)


def _ws_open(ws: Any) -> None:
    hub.register(ws)
    ws.send("hello")


_ws = websocket_app(_ws_handler)
_wscb = websocket_callback_app(_ws_open)
_hogged: list[int] = []


def _hog(n: int, seconds: float) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(n)]
    _hogged.extend(fds)
    gevent.sleep(seconds)
    for fd in fds:
        os.close(fd)
        _hogged.remove(fd)


def _text(start_response: Any, body: bytes, status: str = "200 OK") -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/sse":
        return broker.subscribe(environ, start_response)
    if path == "/idle":
        return idle_broker.subscribe(environ, start_response)
    if path == "/chunked":
        return _chunked(environ, start_response)
    if path == "/ws":
        return _ws(environ, start_response)
    if path == "/wscb":
        return _wscb(environ, start_response)
    if path == "/poke":
        message = query.get("m", ["poke"])[0]
        _pokes.append(message)
        broker.publish(message)
        idle_broker.publish(message)
        hub.broadcast(message)
        _bump()
        return _text(start_response, b"poked\n")
    if path == "/detached":
        return _text(start_response, b"%d\n" % detached_streams())
    if path == "/slow":
        time.sleep(float(query.get("t", ["1"])[0]))
        return _text(start_response, b"slow\n")
    if path == "/hog":
        gevent.spawn(_hog, int(query.get("n", ["1"])[0]), float(query.get("t", ["1"])[0]))
        gevent.sleep(0.05)
        return _text(start_response, b"hogging %d\n" % len(_hogged))
    return _text(start_response, b"ok\n")
