"""WebSocket keepalive: one sweep timer per event loop and setting, not one per connection.

The sweep fires four times per ``min(read_idle_timeout, pong_timeout)`` and pings the silent
connections or fails the ones whose pong is late. Why: docs/websocket.md, docs/design.md.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .connection import WebSocket

__all__ = ["KeepaliveSweep", "join_sweep"]

_CHECKS_PER_PERIOD = 4

_sweeps: weakref.WeakKeyDictionary[Any, dict[tuple[float, float], KeepaliveSweep]] = (
    weakref.WeakKeyDictionary())


class KeepaliveSweep:
    """The keepalive timer shared by the connections of one loop and setting."""

    __slots__ = ("members", "idle", "pong", "timer", "_registry", "_key")

    def __init__(self, loop: Any, idle: float, pong: float,
                 registry: dict[tuple[float, float], KeepaliveSweep]) -> None:
        self.members: set[WebSocket] = set()
        self.idle = idle
        self.pong = pong
        self._registry = registry
        self._key = (idle, pong)
        interval = max(min(idle, pong) / _CHECKS_PER_PERIOD, 0.001)
        self.timer = loop.timer(interval, interval)
        self.timer.start(self._run)

    def discard(self, ws: WebSocket) -> None:
        """Leave the sweep; the last member to leave stops its timer."""
        self.members.discard(ws)
        if not self.members and self._registry.get(self._key) is self:
            del self._registry[self._key]
            self.timer.close()

    def _run(self) -> None:
        now = time.monotonic()
        idle, pong = self.idle, self.pong
        # Most connections are not due: test them without a call each.
        due = [ws for ws in self.members
               if (now - ws._last_rx >= idle if ws._ping_nonce is None
                   else now - ws._ping_sent_at >= pong)]
        for ws in due:
            try:
                ws._keepalive_due(now)
            except Exception:
                ws._internal_error()


def join_sweep(hub: Any, ws: WebSocket, idle: float, pong: float) -> KeepaliveSweep:
    """Add ``ws`` to the sweep of ``hub``'s loop for this setting (made on first use)."""
    registry = _sweeps.get(hub)
    if registry is None:
        registry = _sweeps[hub] = {}
    sweep = registry.get((idle, pong))
    if sweep is None:
        sweep = registry[(idle, pong)] = KeepaliveSweep(hub.loop, idle, pong, registry)
    sweep.members.add(ws)
    return sweep
