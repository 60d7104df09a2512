"""gstream: Server-Sent Events and WebSockets for gevent and WSGI.

The names most applications need are re-exported here. Modules without a
leading underscore are public too (docs/api/ documents them); underscored
ones are private. See README.md for a tour.
"""

from __future__ import annotations

from .broker import BrokerConfig, SSEBroker
from .errors import (
    BackplaneUnavailable,
    BrokerClosed,
    Closed,
    GStreamError,
    HandshakeError,
    TopicError,
)
from .events import Event, EventType, encode, encode_comment, encode_retry, json_event
from .hub import Hub, HubConfig
from .sse import SSE_HEADERS, ChunkedWriter, SSEWriter, last_event_id, stream_events
from .sseparse import EventStreamParser, ParsedEvent
from .websocket import (
    PreparedMessage,
    WebSocket,
    WSConfig,
    close_all,
    prepare,
    reject_response,
    upgrade,
    websocket_app,
    websocket_callback_app,
)

# gstream.server imports gevent.pywsgi, which imports ssl; importing it here
# would load ssl before `gstream serve` has monkey-patched. Load it lazily.
_LAZY = {
    "Server": "gstream.server",
    "serve": "gstream.server",
    "Supervisor": "gstream.workers",
    "GStreamHandler": "gstream.handler",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gstream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BackplaneUnavailable",
    "BrokerClosed",
    "BrokerConfig",
    "ChunkedWriter",
    "Closed",
    "Event",
    "EventStreamParser",
    "EventType",
    "GStreamError",
    "GStreamHandler",
    "HandshakeError",
    "Hub",
    "HubConfig",
    "ParsedEvent",
    "PreparedMessage",
    "SSEBroker",
    "SSEWriter",
    "SSE_HEADERS",
    "Server",
    "Supervisor",
    "TopicError",
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
    "serve",
    "stream_events",
    "upgrade",
    "websocket_app",
    "websocket_callback_app",
]
