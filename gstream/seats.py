"""The seat count of gstream's server: one number for its connection cap.

:class:`Seats` counts every holder of a seat under ``max_connections`` (a
handler greenlet, a detached WebSocket session or SSE stream), the rejections in flight,
and the handlers waiting for a request head, so that an idle keep-alive
connection can give its seat to a newcomer. The policy around it (queue or
reject) is :class:`~gstream.server.Server`'s (docs/server.md, "Connection cap").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gevent import socket as gsocket

__all__ = ["Seats"]


class Seats:
    """Seats held under a cap, and the handlers waiting between requests.

    Args:
        limit: the cap (``max_connections``).
        max_rejecting: the most ``503`` answers in flight at once.
        on_free: called when a seat may be had again (one was released, or
            a kept-alive connection became reclaimable at the cap).
    """

    __slots__ = ("limit", "held", "rejecting", "max_rejecting", "_waiting", "_kept_alive",
                 "_on_free")

    def __init__(self, limit: int, max_rejecting: int, on_free: Callable[[], None]) -> None:
        self.limit = limit
        """The cap: the most seats held at once."""
        self.held = 0
        """Seats held now."""
        self.rejecting = 0
        """``503`` answers in flight (they hold a descriptor, not a seat)."""
        self.max_rejecting = max_rejecting
        """Past this many rejections in flight, a newcomer is closed unanswered."""
        self._waiting: set[Any] = set()  # handlers waiting for a request head
        # ... after serving one on that connection, oldest first: seats to reclaim
        self._kept_alive: dict[Any, None] = {}
        self._on_free = on_free

    @property
    def full(self) -> bool:
        """Whether every seat is held."""
        return self.held >= self.limit

    @property
    def reclaimable(self) -> bool:
        """Whether an idle keep-alive connection could give its seat away."""
        return bool(self._kept_alive)

    def take(self) -> None:
        """Hold one more seat."""
        self.held += 1

    def release(self) -> None:
        """Give a seat back (a client waiting in the backlog may now have it)."""
        self.held -= 1
        self._on_free()

    def start_rejecting(self) -> bool:
        """Count one more ``503`` in flight; False (count nothing) past ``max_rejecting``."""
        if self.rejecting >= self.max_rejecting:
            return False
        self.rejecting += 1
        return True

    def end_rejecting(self) -> None:
        """A ``503`` answer (counted by :meth:`start_rejecting`) is over."""
        self.rejecting -= 1

    def waiting(self, handler: Any, kept_alive: bool) -> None:
        """``handler`` waits for a request head; ``kept_alive``: after a response
        on the same connection, so its seat may go to a newcomer (:meth:`reclaim`)."""
        self._waiting.add(handler)
        if kept_alive:
            self._kept_alive[handler] = None
            if self.held >= self.limit:
                self._on_free()

    def busy(self, handler: Any) -> None:
        """``handler`` has a request head (or is done): no longer idle."""
        self._waiting.discard(handler)
        self._kept_alive.pop(handler, None)

    def reclaim(self) -> bool:
        """Close the oldest idle keep-alive connection for a newcomer; False if none.

        Its seat is released when its handler ends, a moment later: the
        newcomer takes one now, so for that moment the count is one over.
        """
        for handler in self._kept_alive:
            del self._kept_alive[handler]
            self.close_waiting((handler,))
            return True
        return False

    def close_waiting(self, handlers: Iterable[Any] | None = None) -> None:
        """End the wait of ``handlers`` (default: every waiting handler) for a request head."""
        for handler in list(self._waiting if handlers is None else handlers):
            sock = getattr(handler, "socket", None)
            if sock is not None:
                try:
                    # Wakes the handler's pending read with an error: pywsgi
                    # then closes the connection quietly.
                    sock.shutdown(gsocket.SHUT_RD)
                except OSError:
                    pass
