"""Backplanes carry a broker's events between processes.

A broker hands every publish (already id-stamped and encoded once) to its
backplane; the backplane calls the broker's ``deliver`` sink for every event
that should reach this process's subscribers, possibly later and from
another greenlet. The default :class:`LocalBackplane` simply calls the sink
at once, in the publisher's greenlet. A cross-process backplane (Redis)
implements the same :class:`Backplane` protocol.
"""

from __future__ import annotations

from typing import Protocol

from ..events import Event

__all__ = ["Backplane", "DeliverSink", "LocalBackplane"]


class DeliverSink(Protocol):
    """The broker's local delivery entry point."""

    def __call__(self, event: Event, frame: bytes, *, may_block: bool = True) -> int:
        """Deliver ``event`` (encoded as ``frame``) to local subscribers.

        ``may_block`` allows block-mode subscribers to make the caller wait
        (bounded by the broker's block timeout). A backplane delivering
        events that came from another process must pass ``False`` so that
        one stalled local subscriber cannot wedge its receive loop.
        Returns the number of subscribers the frame was queued for.
        """


class Backplane(Protocol):
    """Moves events between the brokers of one topic, across processes."""

    def attach(self, topic: str, deliver: DeliverSink) -> None:
        """Start routing events of ``topic`` to ``deliver``."""

    def publish(self, topic: str, event: Event, frame: bytes) -> int:
        """Send an event; returns how many local subscribers got it at once."""

    def close(self) -> None:
        """Stop routing; idempotent."""


class LocalBackplane:
    """The in-process default: delivery happens synchronously, here and now."""

    def __init__(self) -> None:
        self._deliver: DeliverSink | None = None

    def attach(self, topic: str, deliver: DeliverSink) -> None:
        """Remember the sink; ``topic`` is irrelevant within one process."""
        self._deliver = deliver

    def publish(self, topic: str, event: Event, frame: bytes) -> int:
        """Deliver to this process's subscribers, in the caller's greenlet."""
        if self._deliver is None:
            return 0
        return self._deliver(event, frame, may_block=True)

    def close(self) -> None:
        """Detach from the broker."""
        self._deliver = None
