"""Replay history for the SSE broker: a bounded, ordered log of recent frames.

Entries carry a local sequence number besides the wire id, which is only a
lookup key (never parsed: hostile ids just miss). No I/O and no yields, so the
broker registers a subscriber and snapshots the history atomically (docs/broker.md, "Replay").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import NamedTuple

from .types import StrEnum

__all__ = ["Entry", "History", "ReplayResult", "ReplayStatus"]


class ReplayStatus(StrEnum):
    """How a resume by ``Last-Event-ID`` went (equal to its string value)."""

    FRESH = "fresh"
    """No Last-Event-ID was given: nothing to replay."""
    OK = "ok"
    """Every event after the client's id is available (possibly none)."""
    UNKNOWN = "unknown"
    """The id was never seen (the client gets ``gstream.reset``)."""
    EXPIRED = "expired"
    """The id was seen but fell out of the bounded window (``gstream.reset``)."""
    UNAVAILABLE = "unavailable"
    """A durable backplane's log could not be read (the broker answers 503)."""


class Entry(NamedTuple):
    """One delivered event as kept for replay."""

    seq: int
    id: str
    name: str
    frame: bytes
    at: float


class ReplayResult(NamedTuple):
    """What a resuming client should receive.

    ``status`` is :attr:`ReplayStatus.FRESH`, :attr:`~ReplayStatus.OK`
    (``frames`` holds everything after the client's id, possibly nothing),
    :attr:`~ReplayStatus.UNKNOWN` or :attr:`~ReplayStatus.EXPIRED`.
    """

    status: ReplayStatus
    frames: list[bytes]


class History:
    """A replay window bounded by entry count and by age.

    Args:
        size: most entries kept; ``0`` keeps none (replay disabled, but a
            client whose id is the very latest still resumes cleanly).
        max_age: seconds an entry is kept; ``None`` or ``<= 0`` disables the
            age bound.
        clock: a monotonic clock (tests may inject one).
    """

    def __init__(
        self,
        size: int,
        max_age: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = max(0, int(size))
        self.max_age = max_age if max_age is not None and max_age > 0 else None
        self._clock = clock
        self._entries: deque[Entry] = deque()
        self._index: dict[str, int] = {}
        # Ids that once were indexed; bounded so a long-running broker does
        # not grow without limit. Used only to tell "expired" from "unknown".
        self._evicted_ids: deque[str] = deque(maxlen=max(1024, self.size))
        self._evicted_set: set[str] = set()
        self.last_seq = 0
        """Sequence number of the latest event appended (0 before any)."""
        self.last_id: str | None = None
        """Wire id of the latest event appended."""

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, seq: int, event_id: str, name: str, frame: bytes) -> None:
        """Record a delivered event. ``seq`` must be ``last_seq + 1``."""
        self.last_seq = seq
        self.last_id = event_id
        if self.size == 0:
            return
        now = self._clock()
        self._entries.append(Entry(seq, event_id, name, frame, now))
        if event_id:
            self._index[event_id] = seq
        while len(self._entries) > self.size:
            self._drop_oldest()
        self._expire(now)

    def _drop_oldest(self) -> None:
        old = self._entries.popleft()
        if old.id and self._index.get(old.id) == old.seq:
            del self._index[old.id]
            self._remember_evicted(old.id)

    def _remember_evicted(self, event_id: str) -> None:
        if len(self._evicted_ids) == self._evicted_ids.maxlen:
            self._evicted_set.discard(self._evicted_ids[0])
        self._evicted_ids.append(event_id)
        self._evicted_set.add(event_id)

    def _expire(self, now: float) -> None:
        if self.max_age is None:
            return
        limit = now - self.max_age
        while self._entries and self._entries[0].at < limit:
            self._drop_oldest()

    def since(self, last_id: str, accept: Callable[[str], bool] | None = None) -> ReplayResult:
        """Return the frames a client that last saw ``last_id`` is missing.

        ``accept(name)`` filters by event name (the subscriber's filter).
        """
        if not last_id:
            return ReplayResult(ReplayStatus.FRESH, [])
        if last_id == self.last_id:
            # Nothing was published after the client's id, even if the
            # window itself has expired: no gap, nothing to send.
            return ReplayResult(ReplayStatus.OK, [])
        self._expire(self._clock())
        seq = self._index.get(last_id)
        if seq is None or not self._entries:
            status = ReplayStatus.EXPIRED if last_id in self._evicted_set else ReplayStatus.UNKNOWN
            return ReplayResult(status, [])
        start = seq - self._entries[0].seq + 1
        frames = [
            e.frame
            for e in islice(self._entries, start, None)
            if accept is None or accept(e.name)
        ]
        return ReplayResult(ReplayStatus.OK, frames)
