"""Alias of :mod:`gstream.contrib.locust` (Locust users), kept so existing imports work."""

from __future__ import annotations

from .contrib.locust import (
    Disconnected,
    DuplicateEvent,
    MissedEvents,
    SSEUser,
    StreamCounters,
    WebSocketUser,
    json_timestamp,
    stream_counters,
)

__all__ = [
    "SSEUser",
    "WebSocketUser",
    "StreamCounters",
    "stream_counters",
    "MissedEvents",
    "DuplicateEvent",
    "Disconnected",
    "json_timestamp",
]
