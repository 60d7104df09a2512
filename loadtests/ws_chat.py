"""A WebSocket chat room on the demo's ``/chat``: a few senders, many listeners.

Senders send a message every ``GSTREAM_CHAT_INTERVAL`` seconds (randomised
±50 %) and wait for its broadcast to come back (``rtt``: the round trip
through the Hub). Listeners only receive; every broadcast is reported as
``message`` with its delivery latency from the server's ``ts``. The Hub sends
each message to every member, so the load grows with senders x members.

    locust -f loadtests/ws_chat.py --headless -u 500 -r 100 -t 30s --host http://127.0.0.1:8000
"""

from __future__ import annotations

from _common import env_float
from locust import between, task

from gstream.locust import WebSocketUser

__all__ = ["ChatListener", "ChatSender"]

INTERVAL = env_float("GSTREAM_CHAT_INTERVAL", 2.0)


class ChatListener(WebSocketUser):
    """A member that only listens."""

    path = "/chat"
    weight = 9


class ChatSender(WebSocketUser):
    """A member that talks, timing each message's round trip through the room."""

    path = "/chat"
    weight = 1
    wait_time = between(INTERVAL * 0.5, INTERVAL * 1.5)

    @task
    def say(self) -> None:
        self.request({"text": "hello from a load test"})
