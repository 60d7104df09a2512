"""Enums for the configurable overflow and slow-peer policies.

Each is a :class:`~gstream.types.StrEnum`: configs accept the member or its
string value, and normalise to the member.
"""

from __future__ import annotations

from .types import StrEnum

__all__ = ["SlowPolicy", "InboundOverflow", "Overflow"]


class SlowPolicy(StrEnum):
    """What a hub member whose send buffer is full gets (``HubConfig.slow_policy``)."""

    DROP_OLDEST = "drop_oldest"
    """Its oldest queued messages make room (deflate members drop the new one instead)."""
    DROP_NEWEST = "drop_newest"
    """It misses the new message."""
    CLOSE = "close"
    """It is closed with ``HubConfig.close_code``."""


class InboundOverflow(StrEnum):
    """What a WebSocket does when ``WSConfig.max_queue`` received messages wait unread."""

    PAUSE = "pause"
    """Stop reading the socket until the application catches up (TCP back-pressure
    on the peer); keepalive pings are suspended meanwhile."""
    DROP = "drop"
    """Keep reading (pings and closes are still processed), drop the new message."""
    CLOSE = "close"
    """Close the connection with 1008."""


class Overflow(StrEnum):
    """What gstream's server does past ``max_connections`` (``Server(overflow=...)``)."""

    QUEUE = "queue"
    """Stop accepting: new connections wait in the kernel's listen backlog."""
    REJECT = "reject"
    """Accept and answer ``503`` with ``Retry-After``."""
