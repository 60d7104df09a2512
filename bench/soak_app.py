"""The application a soak run serves (``gstream serve bench.soak_app:make_app()``).

* ``/events``: an SSEBroker stream; a background greenlet publishes
  ``SOAK_RATE`` events a second (default 50) of about 200 bytes;
* ``/ping``: a tiny plain response;
* ``/ws``: a WebSocket echo;
* ``/room``: a WebSocket member of a :class:`~gstream.hub.Hub` room; a
  background greenlet broadcasts ``SOAK_ROOM_RATE`` messages a second
  (default 20) carrying their send time, and a member's text messages are
  relayed to the others;
* ``/stats``: JSON with the process's RSS, fds, live greenlets, broker
  subscribers, lifecycle streams and the room's hub stats, sampled by
  ``bench/soak.py``.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Iterable
from typing import Any

import gevent
from greenlet import greenlet

from gstream.broker import SSEBroker
from gstream.events import Event
from gstream.lifecycle import lifecycle


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _greenlets() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead)


def make_app() -> Any:
    """Build the soak application and start its publisher."""
    broker = SSEBroker(heartbeat_interval=float(os.environ.get("SOAK_HEARTBEAT", "5")))
    rate = float(os.environ.get("SOAK_RATE", "50"))
    ws_app, room_app, hub = _websocket_routes()

    def publisher() -> None:
        n = 0
        while True:
            n += 1
            broker.publish(Event(data=json.dumps({"t": time.time(), "n": n, "pad": "p" * 160})))
            gevent.sleep(1.0 / rate)

    gevent.spawn(publisher)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/events":
            return broker.subscribe(environ, start_response)
        if path == "/ws" and ws_app is not None:
            return ws_app(environ, start_response)
        if path == "/room" and room_app is not None:
            return room_app(environ, start_response)
        if path == "/stats":
            body = json.dumps({
                "t": time.time(), "rss": _rss(), "fds": len(os.listdir("/proc/self/fd")),
                "greenlets": _greenlets(), "subscribers": broker.subscriber_count,
                "lifecycle": len(lifecycle), "broker": broker.stats(),
                "room": hub.stats() if hub is not None else None,
            }).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"pong\n"]

    return app


def _websocket_routes() -> tuple[Any, Any, Any]:
    """WSGI apps for /ws (echo) and /room (a Hub room) and the room's hub,
    or Nones without WebSocket support."""
    try:
        from gstream import websocket_app
        from gstream.hub import Hub
    except ImportError:
        return None, None, None

    def echo(ws: Any) -> None:
        for message in ws:
            ws.send(message)

    hub = Hub(name="soak-room")
    hub.start()
    rate = float(os.environ.get("SOAK_ROOM_RATE", "20"))

    def broadcaster() -> None:
        n = 0
        while True:
            n += 1
            hub.broadcast(json.dumps({"t": time.time(), "n": n, "pad": "r" * 100}))
            gevent.sleep(1.0 / rate)

    gevent.spawn(broadcaster)

    def member(ws: Any) -> None:
        hub.register(ws)  # leaves by itself when the connection closes
        for message in ws:
            if isinstance(message, str):
                hub.broadcast(message, exclude=ws)

    return websocket_app(echo), websocket_app(member), hub
