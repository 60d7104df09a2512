"""gevent-native clients: :class:`SSEClient` and :class:`WebSocketClient`.

Used by gstream's tests, Locust users and benchmarks; cooperative whether or
not the process is monkey-patched.
"""

from __future__ import annotations

from .sse import SSEClient, SSEError
from .websocket import WebSocketClient, connect

__all__ = ["SSEClient", "SSEError", "WebSocketClient", "connect"]
