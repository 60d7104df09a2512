"""An app served behind a reverse proxy in the tests (tests/test_proxy.py, tests/test_behind_nginx.py).

* ``/`` a blank HTML page (the browser runs the checks' scripts in it);
* ``/whoami`` what the app sees: scheme, client address, host, the last
  ``Last-Event-ID`` a stream was opened with;
* ``/events`` an SSE broker stream (heartbeat every ``PROXIED_HEARTBEAT``
  seconds, default 1; replay); ``/quiet`` the same without heartbeats;
* ``POST /publish?data=X`` publishes X; ``POST /cut`` ends every open stream
  as a shutdown would (final event, ``retry:`` hint), then publishes the
  ``then`` values, so that only a resume can deliver them;
* ``/echo`` a WebSocket echo (the server pings after ``PROXIED_HEARTBEAT``
  seconds of silence); ``/echo-quiet`` the same without pings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from gstream import SSEBroker, WSConfig, websocket_app
from gstream.lifecycle import lifecycle

HEARTBEAT = float(os.environ.get("PROXIED_HEARTBEAT", "1"))

feed = SSEBroker(topic="feed", heartbeat_interval=HEARTBEAT, retry=300)
quiet = SSEBroker(topic="quiet", heartbeat_interval=None, retry=300)
_echo = websocket_app(lambda ws: [ws.send(m) for m in ws], WSConfig(read_idle_timeout=HEARTBEAT))
_echo_quiet = websocket_app(lambda ws: [ws.send(m) for m in ws], WSConfig(read_idle_timeout=None))
_seen: dict[str, str | None] = {"last_event_id": None}


def _reply(start_response: Any, body: bytes, ctype: str = "application/json") -> list[bytes]:
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                              ("Cache-Control", "no-store")])
    return [body]


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/events":
        _seen["last_event_id"] = environ.get("HTTP_LAST_EVENT_ID")
        return feed.subscribe(environ, start_response)
    if path == "/quiet":
        return quiet.subscribe(environ, start_response)
    if path == "/echo":
        return _echo(environ, start_response)
    if path == "/echo-quiet":
        return _echo_quiet(environ, start_response)
    if path == "/publish":
        return _reply(start_response, json.dumps(
            {"id": feed.publish(query.get("data", ["x"])[0])}).encode())
    if path == "/cut":
        left = lifecycle.shutdown_all(2.0, "cut by the test")
        lifecycle.reset()  # only these streams end: the server carries on
        for data in query.get("then", []):
            feed.publish(data)
        return _reply(start_response, json.dumps({"left": left}).encode())
    if path == "/whoami":
        return _reply(start_response, json.dumps({
            "scheme": environ.get("wsgi.url_scheme"),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "remote_port": environ.get("REMOTE_PORT"),
            "host": environ.get("HTTP_HOST"),
            "last_event_id": _seen["last_event_id"],
        }).encode())
    return _reply(start_response, b"<!doctype html><title>proxied</title><p>proxied</p>\n",
                  "text/html; charset=utf-8")
