"""gstream: Server-Sent Events and WebSockets for gevent and WSGI.

Public names are re-exported here; the modules behind them are private
details of layout. See README.md for a tour.
"""

from __future__ import annotations

from .broker import BrokerConfig, SSEBroker
from .errors import BrokerClosed, Closed, GStreamError, HandshakeError, SubscriberLimit
from .events import Event, EventType, encode, encode_comment, encode_retry, json_event
from .sse import SSE_HEADERS, ChunkedWriter, SSEWriter, last_event_id, stream_events
from .sseparse import EventStreamParser, ParsedEvent

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BrokerClosed",
    "BrokerConfig",
    "ChunkedWriter",
    "Closed",
    "Event",
    "EventStreamParser",
    "EventType",
    "GStreamError",
    "HandshakeError",
    "ParsedEvent",
    "SSEBroker",
    "SSEWriter",
    "SSE_HEADERS",
    "SubscriberLimit",
    "encode",
    "encode_comment",
    "encode_retry",
    "json_event",
    "last_event_id",
    "stream_events",
]
