"""gstream: Server-Sent Events and WebSockets for gevent and WSGI.

Public names are re-exported here; the modules behind them are private
details of layout. See README.md for a tour.
"""

from __future__ import annotations

from .errors import BrokerClosed, Closed, GStreamError, HandshakeError, SubscriberLimit
from .events import Event, EventType, encode, encode_comment, encode_retry, json_event
from .handler import GStreamHandler
from .sse import SSE_HEADERS, ChunkedWriter, SSEWriter, last_event_id, stream_events
from .sseparse import EventStreamParser, ParsedEvent
from .websocket import PreparedMessage, WebSocket, close_all, prepare
from .wsconfig import WSConfig
from .wsupgrade import reject_response, upgrade, websocket_app

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BrokerClosed",
    "ChunkedWriter",
    "Closed",
    "Event",
    "EventStreamParser",
    "EventType",
    "GStreamError",
    "GStreamHandler",
    "HandshakeError",
    "ParsedEvent",
    "PreparedMessage",
    "SSEWriter",
    "SSE_HEADERS",
    "SubscriberLimit",
    "WSConfig",
    "WebSocket",
    "close_all",
    "encode",
    "encode_comment",
    "encode_retry",
    "json_event",
    "last_event_id",
    "prepare",
    "reject_response",
    "stream_events",
    "upgrade",
    "websocket_app",
]
