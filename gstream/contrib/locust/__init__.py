"""Locust users for Server-Sent Events and WebSocket servers.

:class:`SSEUser` and :class:`WebSocketUser` run gstream's gevent-native
clients inside Locust (itself gevent-based) and report to its statistics under
``request_type`` ``"SSE"`` and ``"WS"``; docs/locust.md lists what each
statistic means. Install with ``pip install gstream[locust]``. Not imported by
``gstream``; ``gstream.locust`` is an alias of this package.
"""

from __future__ import annotations

try:
    import locust  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised without locust installed
    raise ImportError(
        "gstream.contrib.locust needs Locust; install it with: pip install 'gstream[locust]'"
    ) from _exc

from ...errors import Disconnected, DuplicateEvent, MissedEvents
from ._base import StreamCounters, json_timestamp, stream_counters
from ._sse import SSEUser
from ._ws import WebSocketUser

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
