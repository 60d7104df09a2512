"""The in-memory backplanes: one process, no transport.

:class:`LocalBackplane` is the broker's default (delivery in the publisher's
greenlet); :class:`MemoryBackplane` links hubs of one process, standing in
for a cross-process backplane in tests and examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..events import Event
from ..types import Message

__all__ = ["LocalBackplane", "MemoryBackplane"]


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


class MemoryBackplane:
    """A hub backplane in one process: hubs whose backplanes share one ``bus`` exchange broadcasts.

    Each hub plays a process: ``MemoryBackplane(bus)`` with the same ``bus``
    dict for every hub of the "cluster".
    """

    def __init__(self, bus: dict[str, list[MemoryBackplane]] | None = None) -> None:
        self.bus: dict[str, list[MemoryBackplane]] = bus if bus is not None else {}
        self._channel: str | None = None
        self._deliver: Callable[[Message], bool] | None = None

    def attach(self, channel: str, deliver: Callable[[Message], bool]) -> None:
        """Join ``channel`` on the bus."""
        self._channel, self._deliver = channel, deliver
        self.bus.setdefault(channel, []).append(self)

    def broadcast(self, channel: str, payload: Message) -> None:
        """Hand ``payload`` to every other hub of ``channel`` on the bus."""
        for peer in tuple(self.bus.get(channel, ())):
            if peer is not self and peer._deliver is not None:
                peer._deliver(payload)

    def close(self) -> None:
        """Leave the bus."""
        peers = self.bus.get(self._channel or "", [])
        if self in peers:
            peers.remove(self)
        self._deliver = None
