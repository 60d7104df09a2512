"""The demo's WebSocket chat room: every text message goes to every member.

The wire format is part of the demo's HTTP contract (docs/demo-contract.md):
a member sends text, or JSON ``{"text": ..., "ref": ..., "name": ...}``, and
every member (the sender included) receives
``{"type": "chat", "from": <member id>, "text": ..., "ts": <server time>,
"ref": <the sender's ref, if any>, "name": <display name, if any>}``.

Presence (opt-in, ``/chat?presence=1``): the member gets the room's presence
messages (docs/presence.md): a ``sync`` with the member list, then ``join``,
``leave`` and ``update`` (a member's name changed). ``?client=<id>`` (1-32
letters, digits, ``-`` or ``_``) is the member id, so a reconnecting tab stays
the same member; ``?name=<name>`` the name it is listed with.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Iterable
from typing import Any

from ..errors import HandshakeError
from ..presence import MemoryPresence, Presence
from ..sse import query_param
from ..websocket import WebSocket, WSConfig, reject_response, upgrade

__all__ = ["ChatRoom", "MAX_MESSAGE"]

log = logging.getLogger("gstream.demo")

MAX_MESSAGE = 4096
"""Largest chat message accepted, in bytes (larger ones close the connection with 1009)."""
MAX_NAME = 32
MAX_REF = 64
# Generous for people, tight enough that one client cannot turn the room
# into an amplifier (each message is copied to every member).
RATE_PER_SECOND = 20.0
RATE_BURST = 40.0
_CLIENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _clean(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    # Control characters have no business in a name or a ref shown on a page.
    value = "".join(ch for ch in value if ch >= " " and ch != "\x7f").strip()
    return value[:limit] or None


class _Bucket:
    """A token bucket: ``take()`` is False once the sender outpaces the rate."""

    __slots__ = ("tokens", "stamp")

    def __init__(self) -> None:
        self.tokens = RATE_BURST
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(RATE_BURST, self.tokens + (now - self.stamp) * RATE_PER_SECOND)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def chat_payload(member: str, message: str) -> str:
    """The broadcast (JSON text) for ``message`` sent by ``member``."""
    text: Any = message
    ref: Any = None
    name = None
    if message.startswith("{"):
        try:
            obj = json.loads(message)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            text = obj.get("text", "")
            if not isinstance(text, str):
                text = json.dumps(text)
            ref = obj.get("ref")
            name = _clean(obj.get("name"), MAX_NAME)
    out: dict[str, Any] = {"type": "chat", "from": member, "text": text, "ts": time.time()}
    if isinstance(ref, str):
        out["ref"] = ref[:MAX_REF]
    elif isinstance(ref, (int, float)) and not isinstance(ref, bool):
        out["ref"] = ref
    if name:
        out["name"] = name
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


class ChatRoom:
    """A chat room on a :class:`gstream.hub.Hub`; :meth:`app` is its WSGI endpoint.

    Args:
        backplane: passed to the Hub, so rooms in several processes share messages.
        name: the Hub's name (also its backplane channel and presence topic).
        presence: who is in the room (a :class:`~gstream.presence.MemoryPresence`
            by default; a Redis one to list the members of every process).
    """

    def __init__(self, *, backplane: Any = None, name: str = "demo.chat",
                 presence: Presence | None = None) -> None:
        # Imported here so that a broken or missing hub only disables the chat
        # room's construction, not `import gstream.demo`.
        from ..hub import Hub, HubConfig

        self.presence: Presence = presence if presence is not None else MemoryPresence()
        self.hub = Hub(HubConfig(presence=self.presence, presence_events=True), name=name,
                       backplane=backplane)
        self.config = WSConfig(read_limit=MAX_MESSAGE)
        self.refused = 0
        """Members refused by the hub (full or stopping)."""
        self.rate_limited = 0
        """Connections closed with 1008 for sending too fast."""
        self._started = False

    def start(self) -> None:
        """Start the hub (idempotent)."""
        if not self._started:
            self._started = True
            self.hub.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the hub: every member is closed with 1001."""
        if self._started:
            self.hub.stop(timeout)

    @property
    def members(self) -> int:
        """Members in the room now."""
        return int(self.hub.count)

    def app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """The WSGI endpoint: upgrade, join the room, relay messages until the peer leaves."""
        try:
            ws = upgrade(environ, start_response, self.config)
        except HandshakeError as exc:
            return reject_response(exc, start_response)
        try:
            self.session(ws)
        except Exception:
            log.exception("chat session failed; closing with 1011")
            if ws.open:
                ws.close(1011, "internal error")
        return ws.wsgi_result()

    def session(self, ws: WebSocket) -> None:
        """Run one member's session on an open connection."""
        client = query_param(ws.environ, "client") or ""
        member = client if _CLIENT_ID.match(client) else secrets.token_hex(4)
        name = _clean(query_param(ws.environ, "name"), MAX_NAME)
        listens = query_param(ws.environ, "presence") == "1"
        if not self.hub.register(ws, key=member, meta={"name": name},
                                 presence_events=listens):
            self.refused += 1
            ws.close(1013, "chat room unavailable, try again later")
            return
        bucket = _Bucket()
        for message in ws:  # ends quietly when the peer closes
            if not isinstance(message, str):
                ws.close(1003, "text messages only")
                return
            if not bucket.take():
                self.rate_limited += 1
                ws.close(1008, "too many messages")
                return
            payload = chat_payload(member, message)
            said = json.loads(payload).get("name")
            if said and said != name:  # renamed: the presence list follows
                name = said
                self.hub.register(ws, key=member, meta={"name": name}, presence_events=listens)
            self.hub.broadcast(payload)
