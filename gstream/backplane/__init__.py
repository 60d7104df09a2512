"""Backplanes carry events between the processes of one application.

:class:`Backplane` serves :class:`~gstream.broker.SSEBroker` topics (a
:class:`DurableBackplane` also assigns the ids and keeps a shared history, so
a client resumes on any process); :class:`HubBackplane` serves WebSocket hubs.
The in-memory ones are in :mod:`gstream.backplane.memory`, the Redis ones in
:mod:`gstream.backplane.redis` (the ``gstream[redis]`` extra; importable from
here lazily, so this package never imports ``redis``). Design: docs/redis.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from ..events import Event
from .memory import LocalBackplane, MemoryBackplane

if TYPE_CHECKING:  # pragma: no cover
    from .redis import HubLink, Publisher, RedisBackplane, RedisHubBackplane

__all__ = [
    "Backplane",
    "DeliverSink",
    "DurableBackplane",
    "HubBackplane",
    "HubLink",
    "HubSink",
    "LocalBackplane",
    "MemoryBackplane",
    "Publisher",
    "ResumeResult",
    "TopicHistory",
    "RedisBackplane",
    "RedisHubBackplane",
]


class ResumeResult(NamedTuple):
    """A durable backplane's answer to a resuming client.

    ``status`` is ``"ok"`` (``frames`` holds every event after the client's
    id, up to ``latest_id``), ``"unknown"`` (no such id in the log),
    ``"expired"`` (events after it were trimmed from the log) or
    ``"unavailable"`` (the log could not be read; the broker answers 503).
    ``latest_id`` is the id this process has delivered up to, the id a reset
    moves the client to.
    """

    status: str
    frames: list[bytes]
    latest_id: str | None


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

    def detach(self, topic: str, deliver: DeliverSink) -> None:
        """Stop routing ``topic`` to ``deliver`` (the broker is closing); idempotent.

        The backplane itself stays usable by other brokers: whoever created
        it closes it.
        """

    def publish(self, topic: str, event: Event, frame: bytes) -> int:
        """Send an event; returns how many local subscribers got it at once."""

    def close(self) -> None:
        """Stop routing everything and release resources; idempotent."""


@runtime_checkable
class DurableBackplane(Backplane, Protocol):
    """A backplane that numbers events itself and keeps a shared history.

    The broker then publishes with :meth:`append` (the returned id is the
    event's wire id, ordered per topic across all processes), delivers only
    what the backplane hands back to its sink (so the publishing process sees
    each event once, in the global order), and asks :meth:`history_since`
    when its own in-memory window cannot answer a ``Last-Event-ID``.
    """

    def append(self, topic: str, event: Event, *,
               wait_for_id: float | None = None) -> str | None:
        """Append ``event`` (its id is ignored) to the topic's shared log; return its id.

        Returns None when the log did not number it within ``wait_for_id``
        seconds (None: the backplane's default, which may be 0): the event
        is accepted and will be delivered everywhere, with its id, in order.

        Raises:
            BackplaneUnavailable: the transport did not accept the event.
        """

    def append_many(self, topic: str, events: Sequence[Event], *,
                    wait_for_id: float | None = None) -> list[str | None]:
        """:meth:`append` for several events in order, all or none accepted.

        Raises:
            BackplaneUnavailable: the transport did not accept them.
        """

    def catch_up(self, topic: str, last_id: str) -> bool | None:
        """Wait (bounded) until this process has delivered ``last_id``, if it exists.

        Called before a resuming subscriber is registered, so that a client
        that saw an event on a faster process is not served it twice here.
        May return False when the transport could not be read to decide (a
        multi-topic subscribe then answers 503 instead of trying its other
        topics, each as long).
        """

    def history_since(self, topic: str, last_id: str,
                      accept: Callable[[str], bool] | None = None) -> ResumeResult:
        """Frames after ``last_id`` up to what this process has delivered so far.

        Must be called right after the subscriber was registered, with no
        yield in between (the upper bound is read synchronously). The result's
        ``latest_id`` is that bound. Status ``"unavailable"`` means the history
        could not be read (the broker answers 503 so the client retries).
        """


@runtime_checkable
class TopicHistory(Protocol):
    """What a durable backplane adds to serve multi-topic streams (docs/topics.md).

    A stream subscribes to several topics at once, so the broker reads every
    topic's bound first (:meth:`position`, no I/O) and then each range.
    """

    def position(self, topic: str) -> str | None:
        """The id this process has delivered ``topic`` up to; None if not known yet.

        Read synchronously (no yield): live delivery to a stream registered
        now starts right after it.
        """

    def events_between(self, topic: str, after: str, upto: str) -> tuple[str, list[Event]]:
        """Events of ``topic`` with ids in ``(after, upto]``, oldest first, with their ids.

        The status is ``"ok"``, ``"unknown"`` (``after`` was never issued),
        ``"expired"`` (trimmed, or more than the replay limit) or
        ``"unavailable"`` (the log could not be read).
        """


HubSink = Callable[[str | bytes], bool]
"""A hub's entry point for messages from other hubs; returns False when that hub was full."""


class HubBackplane(Protocol):
    """Carries a hub's broadcasts to the hubs of the same channel elsewhere.

    One backplane per hub. The hub fans out locally itself and calls
    :meth:`broadcast` from its own greenlet for every message that should
    reach the other hubs (not ``where``-filtered ones: a predicate cannot
    travel); the backplane calls their ``deliver(payload)``, never the
    broadcasting hub's. ``deliver`` may be called from any greenlet or
    thread, never blocks, and returns False when that hub's channel was full.
    """

    def attach(self, channel: str, deliver: HubSink) -> None:
        """Start routing messages of ``channel`` from other hubs to ``deliver``."""

    def broadcast(self, channel: str, payload: str | bytes) -> None:
        """Send ``payload`` (``str``: text, ``bytes``: binary) to the other hubs.

        Raises:
            BackplaneUnavailable: the transport refused it.
        """

    def close(self) -> None:
        """Detach this hub and release what it owns; idempotent."""


def __getattr__(name: str) -> object:
    # Lazy: importing gstream.backplane must not require the redis package.
    if name in ("HubLink", "Publisher", "RedisBackplane", "RedisHubBackplane"):
        from . import redis as _redis

        return getattr(_redis, name)
    raise AttributeError(f"module 'gstream.backplane' has no attribute {name!r}")
