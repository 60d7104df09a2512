"""A chat room (a Hub, /room) and a feed (an SSEBroker, /events) with presence, served
by `python -m gstream serve` in the presence tests.

``?user=X`` names the member. Environment: GSTREAM_REDIS_URL (a Redis
presence shared with other processes; without it, in-memory),
GSTREAM_PRESENCE_LEASE (seconds), GSTREAM_PRESENCE_PREFIX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from gstream import WebSocket, websocket_app
from gstream.broker import SSEBroker
from gstream.hub import Hub, HubConfig
from gstream.presence import MemoryPresence, Presence


def _user(environ: dict[str, Any]) -> str | None:
    return parse_qs(environ.get("QUERY_STRING", "")).get("user", [None])[0]


def make_app() -> Any:
    url = os.environ.get("GSTREAM_REDIS_URL")
    presence: Presence
    if url:
        from gstream.backplane.redis_presence import RedisPresence

        presence = RedisPresence(url, lease=float(os.environ.get("GSTREAM_PRESENCE_LEASE", "2")),
                                 prefix=os.environ.get("GSTREAM_PRESENCE_PREFIX", "gstream"))
    else:
        presence = MemoryPresence()
    room = Hub(HubConfig(presence=presence, presence_events=True), name="room")
    room.start()
    feed = SSEBroker(topic="feed", presence=presence, presence_events=True, principal=_user,
                     heartbeat_interval=30.0)

    def member(ws: WebSocket) -> None:
        if not room.register(ws, key=_user(ws.environ)):
            ws.close(1008, "presence refused")
            return
        for _ in ws:
            pass

    ws_app = websocket_app(member)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/room":
            return ws_app(environ, start_response)
        if path == "/events":
            return feed.subscribe(environ, start_response)  # type: ignore[no-any-return]
        if path == "/ready":  # the presence's event reader is subscribed
            wait_ready = getattr(presence, "wait_ready", None)
            ok = wait_ready is None or wait_ready(0)
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Length", "0")])
            return []
        if path == "/presence":
            topic = parse_qs(environ.get("QUERY_STRING", "")).get("topic", ["room"])[0]
            body = json.dumps(presence.members(topic).as_dict()).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Length", "0")])
        return []

    return app
