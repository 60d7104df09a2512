"""A mixed, realistic profile: SSE subscribers, chat members, echo round trips,
ordinary HTTP requests to a legacy app, and one publisher, side by side.

The legacy app is the demo's own ``/stats`` and ``/healthz`` until
``GSTREAM_LEGACY_HOST`` points at another app (e.g. the Flask example).

    locust -f loadtests/mixed.py --headless -u 1000 -r 200 -t 60s --host http://127.0.0.1:8000
"""

from __future__ import annotations

import os

from _common import Publisher, env_float, env_int
from locust import HttpUser, between, task

from gstream.locust import SSEUser, WebSocketUser

__all__ = ["FeedReader", "ChatMember", "EchoClient", "LegacyVisitor", "Publisher"]

LEGACY_HOST = os.environ.get("GSTREAM_LEGACY_HOST") or None


class FeedReader(SSEUser):
    """Holds the live feed open (most visitors)."""

    weight = 10
    path = "/events"
    streams = env_int("GSTREAM_STREAMS", 1)
    read_timeout = 60.0


class ChatMember(WebSocketUser):
    """Sits in the chat room, speaking now and then."""

    weight = 3
    path = "/chat"
    wait_time = between(env_float("GSTREAM_CHAT_INTERVAL", 5.0) * 0.5,
                        env_float("GSTREAM_CHAT_INTERVAL", 5.0) * 1.5)

    @task
    def say(self) -> None:
        self.request({"text": "hi"})


class EchoClient(WebSocketUser):
    """Request/response traffic over a WebSocket (``/echo``), with pings."""

    weight = 2
    path = "/echo"
    wait_time = between(0.5, 1.5)

    @task(5)
    def roundtrip(self) -> None:
        self.request({"op": "get", "payload": "x" * 64})

    @task
    def keepalive(self) -> None:
        self.ping()


class LegacyVisitor(HttpUser):
    """Ordinary request/response pages of the legacy app."""

    weight = 5
    wait_time = between(1, 3)
    if LEGACY_HOST:
        host = LEGACY_HOST

    @task(3)
    def stats(self) -> None:
        self.client.get("/stats")

    @task
    def health(self) -> None:
        self.client.get("/healthz")
