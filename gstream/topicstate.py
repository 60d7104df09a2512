"""The broker's per-topic state: who subscribes to what, and the in-memory topic window.

Pure (no I/O, no gevent): :class:`~gstream.broker.SSEBroker` registers a
multi-topic stream's selectors here and asks, per publish, whom to serve. In
memory (no durable backplane) it also keeps one replay window shared by all
topics, numbered by one broker-wide counter, and answers resumes from it.
Reasoning (sizes, why one shared window, when a resume is reset): docs/topics.md.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any, NamedTuple

from .errors import TopicError
from .replay import ReplayStatus
from .topics import Pattern, is_pattern

__all__ = ["TopicRecord", "TopicRegistry", "WindowEntry"]


class WindowEntry(NamedTuple):
    """One event kept for topic replay: its broker number, topic and shared frame body."""

    num: int
    topic: str
    body: bytes
    at: float


class TopicRecord:
    """One topic's state; small on purpose (one exists per subscribed topic)."""

    __slots__ = ("members", "last", "evicted", "count", "idle_at")

    def __init__(self) -> None:
        self.members: dict[str, Any] = {}
        """Subscribed streams by key."""
        self.last = 0
        """Number of the topic's newest event (in-memory numbering; 0: none seen)."""
        self.evicted = 0
        """Number of the topic's newest event that left the window (0: none)."""
        self.count = 0
        """The topic's events in the window now."""
        self.idle_at: float | None = None
        """When the record lost its last member and window entry (kept a while to answer resumes)."""


class _PatternRecord:
    __slots__ = ("pattern", "members")

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.members: dict[str, Any] = {}


class TopicRegistry:
    """Topic and pattern subscriptions of one broker, and its in-memory topic window.

    Args:
        window: most events kept for topic replay, all topics together (0: none).
        max_age: seconds an event stays replayable (None: no age bound); also
            how long a topic's record outlives its last subscriber and event.
        first: the first event number (numbers are broker-wide and increase).
        max_idle: most idle records kept to answer resumes exactly; past it
            the oldest are forgotten (their resumes may be reset).
        max_patterns: most distinct patterns subscribed at once.
        clock: monotonic clock (tests may inject one).
    """

    def __init__(self, window: int, max_age: float | None, first: int, max_idle: int = 100_000,
                 max_patterns: int = 1000, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = max(0, int(window))
        self.max_age = max_age if max_age is not None and max_age > 0 else None
        self.max_idle = max(0, int(max_idle))
        self.max_patterns = max(1, int(max_patterns))
        self._clock = clock
        self.records: dict[str, TopicRecord] = {}
        self.patterns: dict[str, _PatternRecord] = {}
        self._entries: deque[WindowEntry] = deque()
        self._idle: deque[tuple[float, str]] = deque()
        self.start = first
        """Number of the first event of this broker's life."""
        self.last = first - 1
        """Number of the latest event (``start - 1`` before any)."""
        self.evicted_upto = 0
        """Number of the newest event that left the window."""
        self.forgot_upto = 0
        """Newest ``last`` of a forgotten record: older positions of unknown topics are reset."""

    # -- subscriptions --------------------------------------------------------

    def join(self, selector: str, key: str, member: Any) -> None:
        """Subscribe ``member`` (keyed ``key``) to a topic or pattern."""
        if is_pattern(selector):
            prec = self.patterns.get(selector)
            if prec is None:
                if len(self.patterns) >= self.max_patterns:
                    raise TopicError(f"too many distinct patterns on this broker ({self.max_patterns})")
                prec = self.patterns[selector] = _PatternRecord(Pattern(selector))
            prec.members[key] = member
            return
        rec = self.records.get(selector)
        if rec is None:
            rec = self.records[selector] = self._new_record()
        rec.members[key] = member
        rec.idle_at = None

    def leave(self, selector: str, key: str, member: Any) -> bool:
        """Unsubscribe ``member``; True when ``selector`` has no member left here."""
        if is_pattern(selector):
            prec = self.patterns.get(selector)
            if prec is None:
                return True
            if prec.members.get(key) is member:
                del prec.members[key]
            if not prec.members:
                del self.patterns[selector]
                return True
            return False
        rec = self.records.get(selector)
        if rec is None:
            return True
        if rec.members.get(key) is member:
            del rec.members[key]
        if rec.members:
            return False
        if rec.count == 0:
            self._went_idle(selector, rec)
        return True

    def member_count(self, selector: str) -> int:
        """Members of a topic or pattern now."""
        if is_pattern(selector):
            prec = self.patterns.get(selector)
            return len(prec.members) if prec is not None else 0
        rec = self.records.get(selector)
        return len(rec.members) if rec is not None else 0

    def targets(self, topic: str) -> Iterator[tuple[str, Any]]:
        """``(selector, member)`` for every subscription an event of ``topic`` reaches.

        A stream subscribed through several selectors appears once per selector
        (the broker merges them). Cost: the topic's members plus one match per
        distinct pattern.
        """
        rec = self.records.get(topic)
        if rec is not None and rec.members:
            for member in tuple(rec.members.values()):
                yield topic, member
        if self.patterns:
            segments = topic.split("/")
            for text, prec in tuple(self.patterns.items()):
                if prec.pattern.match(segments):
                    for member in tuple(prec.members.values()):
                        yield text, member

    # -- the window -------------------------------------------------------------

    def number(self, topic: str) -> int:
        """Give the next event of ``topic`` its number (no window entry)."""
        self.last += 1
        rec = self.records.get(topic)
        if rec is not None:
            rec.last = self.last
        return self.last

    def append(self, topic: str, body: bytes) -> int:
        """Number the next event of ``topic`` and keep ``body`` for replay; return the number."""
        num = self.number(topic)
        if self.window == 0:
            return num
        now = self._clock()
        rec = self.records.get(topic)
        if rec is None:
            rec = self.records[topic] = self._new_record()
            rec.last = num
        rec.count += 1
        rec.idle_at = None
        self._entries.append(WindowEntry(num, topic, body, now))
        while len(self._entries) > self.window:
            self._evict()
        self._expire(now)
        return num

    def __len__(self) -> int:
        return len(self._entries)

    def _new_record(self) -> TopicRecord:
        rec = TopicRecord()
        # A topic may have had a record that was forgotten: whatever it lost
        # is unknown, so positions older than any forgotten record are reset.
        rec.evicted = self.forgot_upto
        return rec

    def _evict(self) -> None:
        entry = self._entries.popleft()
        self.evicted_upto = entry.num
        rec = self.records.get(entry.topic)
        if rec is None:
            return
        rec.count -= 1
        rec.evicted = entry.num
        if rec.count == 0 and not rec.members:
            self._went_idle(entry.topic, rec)

    def _expire(self, now: float) -> None:
        if self.max_age is not None:
            limit = now - self.max_age
            while self._entries and self._entries[0].at < limit:
                self._evict()
        self._sweep(now)

    def _went_idle(self, topic: str, rec: TopicRecord) -> None:
        if self.max_idle == 0:
            self._forget(topic, rec)
            return
        now = self._clock()
        rec.idle_at = now
        self._idle.append((now, topic))
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        idle = self._idle
        limit = now - self.max_age if self.max_age is not None else None
        while idle and (len(idle) > self.max_idle or (limit is not None and idle[0][0] < limit)):
            at, topic = idle.popleft()
            rec = self.records.get(topic)
            if rec is not None and rec.idle_at == at and not rec.members and rec.count == 0:
                self._forget(topic, rec)

    def _forget(self, topic: str, rec: TopicRecord) -> None:
        del self.records[topic]
        self.forgot_upto = max(self.forgot_upto, rec.last)

    # -- resuming -----------------------------------------------------------------

    def status(self, selector: str, position: int) -> ReplayStatus:
        """Whether every event of ``selector`` after ``position`` is still in the window."""
        if position < self.start - 1 or position > self.last:
            return ReplayStatus.UNKNOWN  # another broker life, or never issued
        if self.window == 0:  # nothing kept: only "nothing happened since" resumes
            return ReplayStatus.OK if position == self.last else ReplayStatus.EXPIRED
        self._expire(self._clock())
        if is_pattern(selector):
            # Conservative: any eviction past the position may have been a match.
            return ReplayStatus.EXPIRED if position < self.evicted_upto else ReplayStatus.OK
        rec = self.records.get(selector)
        if rec is not None:
            return ReplayStatus.EXPIRED if rec.evicted > position else ReplayStatus.OK
        return ReplayStatus.EXPIRED if position < self.forgot_upto else ReplayStatus.OK

    def since(self, positions: Mapping[str, int]) -> list[tuple[list[str], WindowEntry]]:
        """Window entries after ``positions`` (selector -> number), each once, in order.

        Each comes with the selectors it advances. Call :meth:`status` first
        and pass only the selectors it found ``ok``.
        """
        if not positions or not self._entries:
            return []
        low = min(positions.values())
        exact = {s: p for s, p in positions.items() if not is_pattern(s)}
        pats = [(Pattern(s), p) for s, p in positions.items() if is_pattern(s)]
        out: list[tuple[list[str], WindowEntry]] = []
        start = bisect_right(self._entries, low, key=lambda e: e.num)  # numbers increase
        for entry in islice(self._entries, start, None):
            hit: list[str] = []
            pos = exact.get(entry.topic)
            if pos is not None and entry.num > pos:
                hit.append(entry.topic)
            if pats:
                segments = entry.topic.split("/")
                hit.extend(p.text for p, pos in pats if entry.num > pos and p.match(segments))
            if hit:
                out.append((hit, entry))
        return out
