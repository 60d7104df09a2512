"""WebSockets for gevent/WSGI servers: the upgrade, the connection, its configuration.

The public face of the package: import from ``gstream.websocket`` (or ``gstream``), not from
its modules. Layout and reasoning: docs/websocket.md and docs/design.md.
"""

from __future__ import annotations

from ..types import Message
from .callbacks import detached_sessions
from .config import INBOUND_POLICIES, OriginPolicy, WSConfig, same_origin
from .connection import WebSocket, close_all, open_connections
from .frames import PreparedMessage, PreparedRun, prepare, prepare_run
from .upgrade import reject_response, upgrade, websocket_app, websocket_callback_app

__all__ = [
    "INBOUND_POLICIES",
    "Message",
    "OriginPolicy",
    "PreparedMessage",
    "PreparedRun",
    "WSConfig",
    "WebSocket",
    "close_all",
    "detached_sessions",
    "open_connections",
    "prepare",
    "prepare_run",
    "reject_response",
    "same_origin",
    "upgrade",
    "websocket_app",
    "websocket_callback_app",
]
