"""The in-memory broker backplane: the single-process default.

Delivery happens synchronously, in the publisher's greenlet: exactly the
behaviour of a broker or hub without any backplane.
"""

from __future__ import annotations

from typing import Any

from ..events import Event

__all__ = ["LocalBackplane"]


class LocalBackplane:
    """Broker backplane for one process: ``publish`` delivers here and now."""

    def __init__(self) -> None:
        self._sinks: dict[str, list[Any]] = {}

    def attach(self, topic: str, deliver: Any) -> None:
        """Route ``topic``'s publishes to ``deliver``."""
        self._sinks.setdefault(topic, []).append(deliver)

    def detach(self, topic: str, deliver: Any) -> None:
        """Stop routing ``topic`` to ``deliver``; idempotent."""
        sinks = self._sinks.get(topic)
        if sinks and deliver in sinks:
            sinks.remove(deliver)
            if not sinks:
                del self._sinks[topic]

    def publish(self, topic: str, event: Event, frame: bytes) -> int:
        """Deliver to this process's subscribers of ``topic``, in the caller's greenlet."""
        count = 0
        for deliver in tuple(self._sinks.get(topic, ())):
            count += deliver(event, frame, may_block=True)
        return count

    def close(self) -> None:
        """Forget every sink."""
        self._sinks.clear()
