"""Presence: who is connected to a topic (an SSE topic, a Hub room), with join/leave events.

A *member* (a user id, a principal) may hold several *connections* (two
tabs): it joins with its first connection and leaves with its last.
:class:`MemoryPresence` keeps it in this process; the Redis one
(:mod:`gstream.backplane.redis_presence`) shares it between processes and
reaps the members of a process that died. Design: docs/presence.md.
"""

from __future__ import annotations

import enum
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import gevent

from .errors import PresenceRefused

__all__ = ["Presence", "PresenceConfig", "PresenceChange", "PresenceEvent", "PresenceMember",
           "PresenceSnapshot", "MemoryPresence", "PresenceRefused", "Watcher", "EventDispatcher",
           "check_join", "check_topic", "JOIN_EVENT", "LEAVE_EVENT", "UPDATE_EVENT"]

log = logging.getLogger("gstream.presence")

#: SSE event name of a join sent to a topic's subscribers (``BrokerConfig.presence_events``).
JOIN_EVENT = "gstream.join"
#: SSE event name of a leave sent to a topic's subscribers.
LEAVE_EVENT = "gstream.leave"
#: SSE event name of a meta change sent to a topic's subscribers.
UPDATE_EVENT = "gstream.update"


class PresenceChange(str, enum.Enum):
    """What happened to a member of a topic."""

    JOIN = "join"
    """Its first connection joined."""
    LEAVE = "leave"
    """Its last connection left (or its process died and was reaped)."""
    UPDATE = "update"
    """A present member's meta changed (it joined again with another meta)."""


@dataclass(frozen=True)
class PresenceEvent:
    """A member joined or left a topic.

    ``count`` is the number of members of the topic right after the change;
    ``version`` grows with every change (of any topic: one counter per
    presence store), so a client that holds a snapshot of version v skips the
    events with a version up to v, which it already contains.
    """

    kind: PresenceChange
    topic: str
    member: str
    meta: Any
    count: int
    version: int

    def as_dict(self) -> dict[str, Any]:
        """The event as the JSON object sent to clients (docs/presence.md)."""
        return {"event": self.kind.value, "topic": self.topic, "member": self.member,
                "meta": self.meta, "count": self.count, "v": self.version}


@dataclass(frozen=True)
class PresenceMember:
    """One present member: its connections (all processes) and the meta of its latest join."""

    member: str
    connections: int
    meta: Any


@dataclass(frozen=True)
class PresenceSnapshot:
    """The members of a topic at one version."""

    topic: str
    members: dict[str, PresenceMember]
    version: int

    @property
    def count(self) -> int:
        """Number of members."""
        return len(self.members)

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as the JSON object sent to clients (docs/presence.md)."""
        return {"event": "sync", "topic": self.topic, "count": len(self.members),
                "v": self.version,
                "members": [{"member": m.member, "meta": m.meta, "connections": m.connections}
                            for m in sorted(self.members.values(), key=lambda m: m.member)]}


Watcher = Callable[[PresenceEvent], None]
"""A :meth:`Presence.watch` callback; runs in the presence's dispatcher greenlet."""


@dataclass
class PresenceConfig:
    """Bounds of a presence implementation; each refusal raises :class:`PresenceRefused`."""

    max_members: int = 10_000
    """Members per topic (distinct member ids; across processes with Redis)."""
    max_connections: int = 32
    """Connections per member and topic (tabs, devices)."""
    max_meta_bytes: int = 1024
    """Largest meta, as compact JSON in UTF-8."""
    max_member_bytes: int = 256
    """Longest member id, in UTF-8 bytes."""
    max_topics: int = 100_000
    """Topics with members at once (in-memory presence)."""
    max_local: int = 200_000
    """Connections this process holds in presence at once."""
    event_queue: int = 65_536
    """Events waiting for the watchers; beyond, the oldest is dropped and counted."""

    def __post_init__(self) -> None:
        for name in ("max_members", "max_connections", "max_meta_bytes", "max_member_bytes",
                     "max_topics", "max_local", "event_queue"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")


def check_join(config: PresenceConfig, member: str, meta: Any) -> str | None:
    """Validate a join; return the meta as compact JSON (None for no meta).

    Raises:
        PresenceRefused: the member id or the meta breaks a bound.
    """
    if not isinstance(member, str) or not member:
        raise PresenceRefused("member id", "empty or not a str")
    try:  # strict: a lone surrogate (from JSON "\ud800") cannot be stored or sent
        size = len(member.encode("utf-8"))
    except UnicodeEncodeError:
        raise PresenceRefused("member id", "not valid UTF-8") from None
    if size > config.max_member_bytes:
        raise PresenceRefused("member id", f"over {config.max_member_bytes} bytes")
    if meta is None:
        return None
    try:
        text = json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise PresenceRefused("meta", f"not JSON: {exc}") from None
    if size > config.max_meta_bytes:
        raise PresenceRefused("meta", f"over {config.max_meta_bytes} bytes")
    return text


def check_topic(topic: str) -> None:
    """Validate a topic name (the application's, but it travels to Redis).

    Raises:
        PresenceRefused: not a str, or not valid UTF-8 (reason ``"topic"``).
    """
    if not isinstance(topic, str):
        raise PresenceRefused("topic", "not a str")
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        raise PresenceRefused("topic", "not valid UTF-8") from None


class _Unwatch:
    """What :meth:`EventDispatcher.watch` returns: a slotted callable, not a closure
    (a broker holds one per topic in use; 100,000 private topics make it count)."""

    __slots__ = ("watchers", "topic", "callback")

    def __init__(self, watchers: dict[str | None, list[Watcher]], topic: str | None,
                 callback: Watcher) -> None:
        self.watchers = watchers
        self.topic = topic
        self.callback = callback

    def __call__(self) -> None:
        callbacks = self.watchers.get(self.topic)
        if callbacks is not None and self.callback in callbacks:
            callbacks.remove(self.callback)
            if not callbacks:
                del self.watchers[self.topic]


class EventDispatcher:
    """Hands presence events to watchers, in order, from one greenlet.

    Joins and leaves happen inside callbacks that must not block (a
    WebSocket's close callback, a broker's unregister); watchers may. So
    events are queued (bounded: the oldest is dropped and counted) and one
    greenlet, spawned when there is work, calls the watchers.
    """

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._queue: deque[PresenceEvent] = deque()
        self._watchers: dict[str | None, list[Watcher]] = {}
        self._resyncs: list[Callable[[], None]] = []
        self._runner: gevent.Greenlet | None = None
        self.dropped = 0
        """Events dropped because the queue was full."""
        self.failed = 0
        """Watcher calls that raised."""

    def watch(self, topic: str | None, callback: Watcher) -> Callable[[], None]:
        """Call ``callback`` for events of ``topic`` (None: every topic); return the unwatch."""
        self._watchers.setdefault(topic, []).append(callback)
        return _Unwatch(self._watchers, topic, callback)

    def on_resync(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` when events may have been missed; return the unregister."""
        self._resyncs.append(callback)

        def remove() -> None:
            if callback in self._resyncs:
                self._resyncs.remove(callback)

        return remove

    def resync(self) -> None:
        """Events were missed (a shared store's reader reconnected): call the resync callbacks."""
        for callback in tuple(self._resyncs):
            try:
                callback()
            except Exception:
                self.failed += 1
                log.exception("presence resync callback failed")

    @property
    def idle(self) -> bool:
        """True when nobody watches any topic."""
        return not self._watchers

    def watched(self, topic: str) -> bool:
        """True if some watcher would get an event of ``topic``."""
        return topic in self._watchers or None in self._watchers

    def emit(self, event: PresenceEvent) -> None:
        """Queue ``event`` for its watchers (never blocks)."""
        if not self.watched(event.topic):
            return
        if len(self._queue) >= self._limit:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        if self._runner is None:
            self._runner = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self._queue:
                event = self._queue.popleft()
                for callback in (*self._watchers.get(event.topic, ()),
                                 *self._watchers.get(None, ())):
                    try:
                        callback(event)
                    except Exception:
                        self.failed += 1
                        log.exception("presence watcher failed on %s %r", event.kind.value,
                                      event.topic)
        finally:
            self._runner = None

    def clear(self) -> None:
        """Forget every watcher and queued event."""
        self._watchers.clear()
        self._resyncs.clear()
        self._queue.clear()


@runtime_checkable
class Presence(Protocol):
    """Who is connected to which topic; implemented by :class:`MemoryPresence`
    and :class:`gstream.backplane.redis_presence.RedisPresence`.

    Call it from the thread of the gevent loop that serves the connections.
    """

    config: PresenceConfig

    def join(self, topic: str, member: str, meta: Any = None) -> str:
        """Add one connection of ``member`` to ``topic``; return its connection id.

        ``meta`` (any JSON value, e.g. a display name) is shown with the
        member. The member's first connection emits a join event; a later
        join with another meta replaces it and emits an update event.
        Never blocks.

        Raises:
            PresenceRefused: a bound (:class:`PresenceConfig`) was reached.
        """

    def leave(self, conn: str) -> None:
        """Remove the connection ``conn`` (from :meth:`join`); idempotent, never blocks.

        The member's last connection emits a leave event.
        """

    def members(self, topic: str) -> PresenceSnapshot:
        """The members of ``topic`` now.

        Raises:
            BackplaneUnavailable: the shared store could not be read.
        """

    def count(self, topic: str) -> int:
        """Number of members of ``topic`` now.

        Raises:
            BackplaneUnavailable: the shared store could not be read.
        """

    def watch(self, topic: str | None, callback: Watcher) -> Callable[[], None]:
        """Call ``callback(event)`` for each join/leave of ``topic`` (None: all); return
        a function that stops it. Callbacks run in one greenlet, in order."""

    def on_resync(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` when events may have been missed (a shared store's
        event reader reconnected): lists built from events must be re-read.
        Return a function that stops it."""

    def close(self) -> None:
        """Leave every connection of this process and stop; idempotent."""


class _Entry:
    __slots__ = ("conns", "meta")

    def __init__(self, meta: str | None) -> None:
        self.conns = 0
        self.meta = meta  # compact JSON text, decoded when read


def _meta(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class MemoryPresence:
    """Presence within this process (the default).

    Args:
        config: the bounds; keyword ``overrides`` replace its fields.
    """

    def __init__(self, config: PresenceConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else PresenceConfig()
        self.config = PresenceConfig(**{**base.__dict__, **overrides})
        self._topics: dict[str, dict[str, _Entry]] = {}  # topic -> member -> entry
        # connection id -> (topic, member)
        self._conns: dict[str, tuple[str, str]] = {}
        self._seq = 0
        self._version = 0
        self._closed = False
        self._events = EventDispatcher(self.config.event_queue)

    def join(self, topic: str, member: str, meta: Any = None) -> str:
        """See :meth:`Presence.join`."""
        if self._closed:
            raise PresenceRefused("closed")
        cfg = self.config
        check_topic(topic)
        text = check_join(cfg, member, meta)
        if len(self._conns) >= cfg.max_local:
            raise PresenceRefused("local", f"{cfg.max_local} connections")
        t = self._topics.get(topic)
        if t is None:
            if len(self._topics) >= cfg.max_topics:
                raise PresenceRefused("topics", f"{cfg.max_topics} topics")
            t = self._topics[topic] = {}
        entry = t.get(member)
        if entry is None:
            if len(t) >= cfg.max_members:
                raise PresenceRefused("topic full", f"{cfg.max_members} members")
            entry = t[member] = _Entry(text)
        elif entry.conns >= cfg.max_connections:
            raise PresenceRefused("connections", f"{cfg.max_connections} per member")
        changed = entry.conns > 0 and text is not None and text != entry.meta
        if changed:
            entry.meta = text
        entry.conns += 1
        self._seq += 1
        conn = f"{self._seq:x}"
        self._conns[conn] = (topic, member)
        if entry.conns == 1 or changed:
            self._version += 1
            kind = PresenceChange.UPDATE if changed else PresenceChange.JOIN
            self._emit(kind, topic, member, entry.meta, len(t))
        return conn

    def leave(self, conn: str) -> None:
        """See :meth:`Presence.leave`."""
        found = self._conns.pop(conn, None)
        if found is None:
            return
        topic, member = found
        t = self._topics[topic]
        entry = t[member]
        entry.conns -= 1
        if entry.conns > 0:
            return
        del t[member]
        self._version += 1
        self._emit(PresenceChange.LEAVE, topic, member, entry.meta, len(t))
        if not t:
            del self._topics[topic]

    def _emit(self, kind: PresenceChange, topic: str, member: str, meta: str | None,
              count: int) -> None:
        if self._events.watched(topic):
            self._events.emit(PresenceEvent(kind, topic, member, _meta(meta), count,
                                            self._version))

    def members(self, topic: str) -> PresenceSnapshot:
        """See :meth:`Presence.members`."""
        t = self._topics.get(topic) or {}
        return PresenceSnapshot(topic, {m: PresenceMember(m, e.conns, _meta(e.meta))
                                        for m, e in t.items()}, self._version)

    def count(self, topic: str) -> int:
        """See :meth:`Presence.count`."""
        t = self._topics.get(topic)
        return 0 if t is None else len(t)

    def watch(self, topic: str | None, callback: Watcher) -> Callable[[], None]:
        """See :meth:`Presence.watch`."""
        return self._events.watch(topic, callback)

    def on_resync(self, callback: Callable[[], None]) -> Callable[[], None]:
        """See :meth:`Presence.on_resync` (never called: nothing is missed in memory)."""
        return self._events.on_resync(callback)

    def topics(self) -> list[str]:
        """Topics with at least one member."""
        return list(self._topics)

    @property
    def connections(self) -> int:
        """Connections held now."""
        return len(self._conns)

    def stats(self) -> dict[str, int]:
        """Topics, connections, events dropped (watchers too slow), watcher failures."""
        return {"topics": len(self._topics), "connections": len(self._conns),
                "events_dropped": self._events.dropped, "watcher_failures": self._events.failed}

    def close(self) -> None:
        """See :meth:`Presence.close` (leave events are still emitted)."""
        if self._closed:
            return
        for conn in list(self._conns):
            self.leave(conn)
        self._closed = True
