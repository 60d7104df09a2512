"""SSEBroker: fan events out to many Server-Sent Events subscribers.

Each subscriber has its own bounded queue. Under gstream's server an idle
subscriber holds no greenlet: once the response head is out, its frames are
written by loop callbacks (:mod:`gstream.detached`); elsewhere the request's
own greenlet reads the queue and yields coalesced frames to the WSGI server
(docs/broker.md: the design and the protocol events it emits).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, cast
from urllib.parse import parse_qsl

import gevent
from gevent.event import Event as GEvent
from gevent.hub import Waiter

from .backplane import Backplane, DurableBackplane, LocalBackplane, TopicHistory
from .detached import DetachedStream
from .errors import BackplaneUnavailable, BrokerClosed, PresenceRefused, TopicError
from .events import Event, EventType, encode, encode_comment, encode_retry, truncate_field
from .lifecycle import Lifecycle, lifecycle_for
from .presence import JOIN_EVENT, LEAVE_EVENT, UPDATE_EVENT, Presence, PresenceChange, PresenceEvent
from .replay import History, ReplayStatus
from .sse import SSE_HEADERS, last_event_id
from .threadsafe import LoopBinding
from .topics import (
    CURSOR_VERSION,
    MAX_CURSOR,
    check_topic,
    encode_cursor,
    event_type,
    is_pattern,
    parse_cursor,
    parse_selectors,
)
from .topicstate import TopicRegistry
from .types import Environ, StartResponse

__all__ = [
    "BrokerConfig",
    "BrokerCounters",
    "BrokerStats",
    "SSEBroker",
    "MISSED_EVENT",
    "RESET_EVENT",
    "EVICTED_EVENT",
    "SHUTDOWN_EVENT",
    "CUT_EVENT",
    "DENIED_EVENT",
]

log = logging.getLogger("gstream.broker")

#: Event name telling a subscriber how many events it lost (drop-oldest).
MISSED_EVENT = "gstream.missed"
#: Event name telling a resuming subscriber its Last-Event-ID could not be honoured.
RESET_EVENT = "gstream.reset"
#: Event name sent to a stream replaced by a newer one of the same caller.
EVICTED_EVENT = "gstream.evicted"
#: Event name sent on graceful server shutdown.
SHUTDOWN_EVENT = "gstream.shutdown"
#: Event name for a block-mode subscriber cut loose after its block timeout.
CUT_EVENT = "gstream.cut"
#: Event name listing the topics a multi-topic stream asked for and was refused.
DENIED_EVENT = "gstream.denied"

HEARTBEAT = encode_comment("heartbeat")
_CURSOR_ID = f"id: {CURSOR_VERSION};".encode()
OPEN_COMMENT = encode_comment("stream open")
MAX_FILTER_NAMES = 32
#: Events published back to back before sleeping readers are woken even if
#: the publisher has not let the event loop go round yet (bounds the latency
#: that batching adds to the first events of a long burst).
MAX_BATCH = 64
_NO_LIMIT = 1 << 62

_TEXT = [("Content-Type", "text/plain; charset=utf-8")]


@dataclass
class BrokerConfig:
    """Settings of an :class:`SSEBroker`; out-of-range values are normalised."""

    topic: str = ""
    """Logical name (also the backplane channel)."""
    default_buffer: int = 64
    """Per-subscriber queue capacity when the client asks for none (<= 0 means 64)."""
    max_buffer: int = 1024
    """Upper clamp of a client-requested buffer (<= 0 means 1024)."""
    heartbeat_interval: float | None = 30.0
    """Seconds of idleness before a ``: heartbeat`` comment; None or <= 0 disables."""
    allow_client_slow_mode: bool = False
    """Whether a client may ask for block mode (``?slow=block`` / ``X-SSE-Slow: block``)."""
    block_timeout: float = 5.0
    """Longest one publish waits for block-mode subscribers (<= 0 means 5)."""
    write_timeout: float | None = 30.0
    """Seconds a write to a stream may take before its client counts as gone
    (it stopped reading, or vanished without a FIN): the stream is closed
    and counted in ``stalled``. None or <= 0 never gives up."""
    principal: Callable[[Environ], str | None] | None = None
    """Caller identity scoping subscriber-id replacement; None never evicts."""
    max_subscribers: int = 0
    """Exact cap on concurrent subscribers; 0 (or less) means unlimited."""
    retry_after: int = 5
    """Seconds sent as ``Retry-After`` with a 503 at the cap."""
    history_size: int = 1024
    """Events kept for Last-Event-ID replay; 0 disables replay."""
    history_max_age: float | None = 300.0
    """Seconds an event stays replayable; None or <= 0: no age bound."""
    retry: int = 3000
    """Reconnect hint (ms) sent on open and with final frames; <= 0 sends none."""
    max_subscriber_id: int = 256
    """Longest subscriber id kept, in UTF-8 bytes (cut on a character boundary)."""
    first_id: int | None = None
    """First broker-assigned id; None starts from the clock (microseconds)
    so a restarted broker never re-issues its predecessor's ids."""
    foreign_queue: int = 65536
    """Cross-thread publishes queued at most before the oldest is dropped."""
    backplane: Backplane | None = field(default=None, repr=False)
    """Cross-process transport; None means in-process only. A
    :class:`~gstream.backplane.DurableBackplane` (Redis) assigns the ids
    and answers resumes the in-memory window cannot."""
    authorize: Callable[[Environ, str], bool] | None = field(default=None, repr=False)
    """``(environ, topic) -> bool`` at subscribe time, for each topic or pattern
    asked for (the default topic too); None allows everything. See docs/topics.md."""
    max_topics: int = 16
    """Most topics and patterns on one stream (``?topic=`` values); more is a 400."""
    topic_history: int = 10_000
    """Events of all topics kept in memory for multi-topic resumes (``history_max_age`` applies)."""
    max_patterns: int = 1000
    """Most distinct patterns subscribed at once on this broker."""
    # -- presence hook (issue 22, docs/presence.md) --
    presence: Presence | None = field(default=None, repr=False)
    """Each subscriber joins this presence for :attr:`topic` while its stream
    is open, as its principal (``anon:<subscriber id>`` without one)."""
    presence_events: bool = False
    """Send subscribers ``gstream.join`` / ``gstream.leave`` / ``gstream.update`` events."""
    presence_meta: Callable[[Environ], Any] | None = None
    """The meta (a JSON value) a subscriber is listed with; None: none."""
    # -- end of the presence hook --

    def __post_init__(self) -> None:
        if self.max_buffer <= 0:
            self.max_buffer = 1024
        if self.default_buffer <= 0:
            self.default_buffer = 64
        self.default_buffer = min(self.default_buffer, self.max_buffer)
        if self.heartbeat_interval is not None and self.heartbeat_interval <= 0:
            self.heartbeat_interval = None
        if self.block_timeout <= 0:
            self.block_timeout = 5.0
        if self.write_timeout is not None and self.write_timeout <= 0:
            self.write_timeout = None
        self.max_subscribers = max(0, self.max_subscribers)
        self.retry_after = max(1, int(self.retry_after))
        self.history_size = max(0, int(self.history_size))
        self.max_subscriber_id = max(1, int(self.max_subscriber_id))
        self.foreign_queue = max(1, int(self.foreign_queue))
        self.max_topics = max(1, int(self.max_topics))
        self.topic_history = max(0, int(self.topic_history))
        self.max_patterns = max(1, int(self.max_patterns))


class BrokerCounters(TypedDict):
    """The counters of :meth:`SSEBroker.stats`, totals since the broker started."""

    published: int
    """Events accepted by :meth:`SSEBroker.publish` (and its thread-safe form)."""
    enqueued: int
    """Frames queued to subscribers."""
    delivered: int
    """Frames written to subscribers' streams."""
    dropped: int
    """Frames drop-oldest subscribers lost (each learns it from ``gstream.missed``)."""
    cut: int
    """Block-mode subscribers cut loose after ``block_timeout``."""
    stalled: int
    """Streams closed because a write to them took longer than ``write_timeout``."""
    evicted: int
    """Streams replaced by a newer one with the same subscriber id."""
    rejected: int
    """Subscribes refused at ``max_subscribers``."""
    resets: int
    """Resumes answered with ``gstream.reset`` (id unknown or expired)."""
    replayed: int
    """Frames replayed to resuming clients."""
    foreign: int
    """Publishes from other threads, delivered."""
    foreign_dropped: int
    """Publishes from other threads dropped (``foreign_queue`` full)."""
    foreign_failed: int
    """Publishes from other threads that raised."""


class BrokerStats(BrokerCounters):
    """What :meth:`SSEBroker.stats` returns: the counters and the broker's state now."""

    topic: str
    subscribers: int
    """Open streams now."""
    history: int
    """Events in the replay window now."""
    last_id: str | None
    """Id of the latest event."""
    closed: bool
    topics: int
    """Topic records now (subscribed topics, and recent ones kept to answer resumes)."""
    topic_streams: int
    """Open multi-topic streams now."""


def _register(sub: _Subscriber, environ: Environ) -> None:
    """Register ``sub`` with its request's lifecycle registry (its server's, else the process's)."""
    sub.lifecycle = found = lifecycle_for(environ)
    found.register(sub)


class _Subscriber:
    """One open stream. Kept small: memory per idle subscriber matters."""

    __slots__ = (
        "broker", "key", "sid", "principal", "names", "block", "capacity", "items",
        "parked", "due", "beat", "last_write", "room", "final", "ended", "greenlet",
        "dropped", "missed", "delivered", "since", "start", "lifecycle", "__weakref__",
    )

    def __init__(self, broker: SSEBroker, key: str, sid: str, principal: str,
                 names: frozenset[str] | None, block: bool, capacity: int) -> None:
        self.broker = broker
        self.key = key
        self.sid = sid
        self.principal = principal
        self.names = names
        self.block = block
        self.capacity = capacity
        # A list, not a deque(maxlen): an empty list is 56 bytes and clear()
        # frees its storage, while a deque keeps a 64-slot block (~600 bytes)
        # for the life of every idle stream. Drops are done by hand.
        self.items: list[bytes] = []
        # Waking (see SSEBroker._wake): ``parked`` is the Waiter the reader
        # sleeps on (None while it runs or writes), ``due`` marks it queued
        # for the next batched wake-up, ``beat`` asks for a heartbeat.
        self.parked: Waiter | DetachedStream | None = None
        self.due = False
        self.beat = False
        # Last time frames (or a heartbeat) left for this stream: the
        # heartbeat's idle clock, and the stall check's start of a write.
        self.last_write = time.monotonic()
        self.room: GEvent | None = GEvent() if block else None
        self.final: bytes | None = None
        self.ended = False
        self.greenlet: Any = None
        self.dropped = 0
        self.missed = 0
        self.delivered = 0
        self.since = time.time()
        # A follower of the broker's shared batch (SSEBroker._follow): the
        # absolute position of the first batch frame not yet taken; -1: its
        # frames go to ``items`` one by one.
        self.start = -1
        # The registry a graceful stop reaches it through (set on registering).
        self.lifecycle: Lifecycle | None = None

    def shutdown(self, reason: str = "server shutting down") -> None:
        """Lifecycle hook: end this stream with a final event and retry hint."""
        self.broker._end(self, self.broker._final(SHUTDOWN_EVENT, reason))

    def info(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "subscriber_id": self.sid,
            "mode": "block" if self.block else "drop-oldest",
            "buffer": self.capacity,
            "depth": len(self.items) if self.start < 0 else self.broker._batch_depth(self),
            "dropped": self.dropped,
            "delivered": self.delivered,
            "events": sorted(self.names) if self.names else None,
            "connected_at": self.since,
        }

    # -- gstream.detached.StreamSource: served without a greenlet ----------

    def pull(self) -> tuple[bytes, bool]:
        """What is due now, and whether the stream ends after it."""
        return self.broker._take(self)

    def stream_ready(self, stream: DetachedStream | None) -> None:
        """Park (or unpark, while a write is pending) the detached stream."""
        self.parked = stream  # woken with switch(), like a Waiter
        if stream is not None:
            self.broker._follow(self)
        elif self.start >= 0:
            self.broker._unfollow(self)  # its own queue (and policy) from now on

    def stream_closed(self) -> None:
        """The detached stream is over: unregister."""
        self.parked = None
        self.broker._unregister(self)

    def abort(self, reason: str = "aborted") -> None:
        """Lifecycle hook at the shutdown deadline: close a detached stream now."""
        stream = self.greenlet
        if isinstance(stream, DetachedStream):
            stream.abort(reason)


class _Body:
    """The WSGI body of one subscriber; ``close()`` always unregisters
    (unless the stream was detached: it then unregisters when it ends).

    A class rather than a bare generator because closing a generator that
    was never started does not run its ``finally`` block.
    """

    __slots__ = ("_sub", "_gen")

    def __init__(self, sub: _Subscriber, prelude: bytes) -> None:
        self._sub = sub
        self._gen: Generator[bytes, None, None] | None = sub.broker._run(sub, prelude)

    def __iter__(self) -> Generator[bytes, None, None]:
        # The generator itself: one Python frame less on every idle stack.
        assert self._gen is not None
        return self._gen

    def __next__(self) -> bytes:
        assert self._gen is not None
        return next(self._gen)

    def detach_stream(self, make: Callable[[], DetachedStream | None]) -> bool:
        """Go on without the request greenlet (GStreamHandler calls it once the prelude is out).

        ``make`` moves the connection to a :class:`~gstream.detached.DetachedStream`
        (None where the server does not allow it). True: the stream is served by
        loop callbacks from now on and the handler must neither iterate nor
        write any more.
        """
        sub = self._sub
        if sub.ended or self._gen is None:
            return False
        stream = make()
        if stream is None:
            return False
        gen, self._gen = self._gen, None
        gen.close()  # suspended after the prelude: nothing to clean up
        sub.greenlet = stream
        sub.last_write = time.monotonic()
        stream.start(sub)
        broker = sub.broker
        broker._start_heartbeats()
        if sub.items or sub.final is not None:
            broker._wake(sub)  # published while the prelude was written
        return True

    def close(self) -> None:
        gen = self._gen
        if gen is None:
            return  # detached: the stream unregisters when it ends
        try:
            gen.close()
        finally:
            self._sub.broker._unregister(self._sub)


def _type_name(topic: str, body: bytes) -> str:
    # The event name inside a topic frame body ("event: <topic>#<name>").
    line = body.split(b"\n", 1)[0].decode("utf-8", "replace")
    kind = line[len("event: "):] if line.startswith("event: ") else topic
    return kind[len(topic) + 1:] if kind.startswith(topic + "#") else "message"


def _presence_name(event: PresenceEvent) -> str:
    return (JOIN_EVENT if event.kind is PresenceChange.JOIN else
            LEAVE_EVENT if event.kind is PresenceChange.LEAVE else UPDATE_EVENT)


def _presence_data(event: PresenceEvent) -> str:
    return json.dumps(event.as_dict(), separators=(",", ":"), ensure_ascii=False)


def _durable_wait(backplane: Any) -> float:
    """Longest a subscribe waits for a topic being attached elsewhere (the catch-up bound)."""
    return float(getattr(backplane, "catch_up_timeout", 2.0) or 2.0)


class _View:
    """A multi-topic stream's subscriptions: its selectors and the position of each.

    The stream itself is an ordinary :class:`_Subscriber` (its queue, its
    reader, heartbeats, caps); this is all a multi-topic stream adds.
    """

    __slots__ = ("sub", "selectors", "parts", "names")

    def __init__(self, sub: _Subscriber, selectors: list[str], names: frozenset[str] | None) -> None:
        self.sub = sub
        self.selectors = selectors
        self.parts: list[bytes] = []
        """``b"selector=position"`` per selector, in order: the wire cursor of the
        last event queued, kept encoded so a frame costs one join."""
        self.names = names

    def set_positions(self, positions: dict[str, str]) -> None:
        self.parts = [f"{sel}={positions[sel]}".encode() for sel in self.selectors]


class _TopicSink:
    """A durable backplane's delivery entry point for one topic of this broker."""

    __slots__ = ("broker", "topic", "users", "ready")

    def __init__(self, broker: SSEBroker, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self.users = 0
        self.ready = GEvent()

    def __call__(self, event: Event, frame: bytes, *, may_block: bool = True) -> int:
        return self.broker._deliver_topic(self.topic, event, event.id)


#: Presence refusals caused by the request itself (its member id or meta), not by a capacity.
_PRESENCE_INPUT = frozenset(("member id", "meta", "topic"))


def _header(environ: Environ, name: str) -> str | None:
    raw = environ.get(name)
    if raw is None:
        return None
    try:  # WSGI header values are latin-1-decoded bytes; recover the UTF-8.
        return str(raw).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return str(raw)


def _cut_utf8(value: str, limit: int) -> str:
    data = value.encode("utf-8", "replace")
    if len(data) <= limit:
        return value
    return data[:limit].decode("utf-8", "ignore")


def _parse_buffer(raw: str | None) -> int | None:
    if raw is None:
        return None
    raw = raw.strip()
    if not raw or len(raw) > 9 or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if value > 0 else None


class SSEBroker:
    """Fan events out to many SSE subscribers of one topic.

    ``broker.subscribe`` is a WSGI application (mount it at any path);
    :meth:`stream` gives the same stream to framework views.
    :meth:`publish` may be called from any greenlet, and from native OS
    threads (it is marshalled into the hub's thread).

    Args:
        config: a :class:`BrokerConfig`; keyword ``overrides`` replace its fields.
    """

    def __init__(self, config: BrokerConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else BrokerConfig()
        self.config = replace(base, **overrides) if overrides else replace(base)
        cfg = self.config
        self._subs: dict[str, _Subscriber] = {}
        self._history = History(cfg.history_size, cfg.history_max_age)
        self._next_id = cfg.first_id if cfg.first_id is not None else time.time_ns() // 1000
        # Multi-topic streams (docs/topics.md): their views by key, the topic
        # state, and (durable backplane) one sink per attached topic.
        self._views: dict[str, _View] = {}
        self._topic_sinks: dict[str, _TopicSink] = {}
        self._topics_used = False
        self._seq = 0
        self._closed = False
        self._stats = cast(BrokerCounters, dict.fromkeys(BrokerCounters.__annotations__, 0))
        self._foreign: deque[tuple[str | None, Event]] = deque()
        self._pump: Any = None
        self._binding = LoopBinding()
        # Batched wake-ups: readers with new frames are queued here and woken
        # together by one zero-delay timer, i.e. after the publishing
        # greenlet yields *and* the loop has run the other ready callbacks.
        # A publisher that yields between events (sleep(0)) therefore
        # publishes several before the readers run, and each reader sends
        # them in one write: one switch and one send per burst per reader
        # instead of per event.
        self._due: list[_Subscriber] = []
        # The shared batch (docs/broker.md, "One join per batch"): idle
        # drop-oldest subscribers without a filter or anything of their own
        # queued are *followers*; a publish appends its frame here once for
        # all of them (``_batch[0]`` is absolute position ``_base``), and each
        # takes ``join(_batch[its start:])``, joined once per distinct start.
        # ``_direct`` holds the other registered subscribers (today's path).
        self._direct: dict[_Subscriber, None] = {}
        self._followers: dict[_Subscriber, None] = {}
        self._fwait: list[_Subscriber] = []  # followers to mark due at the next frame
        self._batch: list[bytes] = []
        self._base = 0
        self._limit = _NO_LIMIT  # lowest start + capacity of a follower (or lower)
        self._joined: dict[int, bytes] = {}  # start -> joined frames, for _joined_end
        self._joined_end = -1
        self._flush_timer: Any = None
        self._pending = 0  # events published since the last wake-up
        self._flush_soon = False
        # One timer for all subscribers (heartbeats and the stall check)
        # instead of a timeout per idle stream (memory, and a wake-up each).
        self._beat_timer: Any = None
        # Ended streams whose final bytes have not left yet (the stall check
        # still watches them; _subs no longer holds them).
        self._ending: set[_Subscriber] = set()
        self._bind_hub()
        self._backplane: Backplane = cfg.backplane if cfg.backplane is not None else LocalBackplane()
        self._durable: DurableBackplane | None = (
            self._backplane if isinstance(self._backplane, DurableBackplane) else None)
        self._topics = TopicRegistry(0 if self._durable is not None else cfg.topic_history,
                                     cfg.history_max_age, self._next_id,
                                     max_idle=0 if self._durable is not None else 100_000,
                                     max_patterns=cfg.max_patterns)
        self._backplane.attach(cfg.topic, self._deliver_local)
        # Presence hook (issue 22): subscriber -> its presence connection id, or
        # the tuple of them for a multi-topic stream (one per concrete topic).
        self._presence_conns: dict[_Subscriber, str | tuple[str, ...]] = {}
        # The stream the last _admit replaced (same id and principal): at a
        # presence connection cap its places go to its successor.
        self._replaced: _Subscriber | None = None
        self._presence_unwatch: Callable[[], None] | None = None
        # With presence_events: topic (other than config.topic) -> its unwatch,
        # while a multi-topic stream of this process names it.
        self._presence_watches: dict[str, Callable[[], None]] = {}
        self._topic_watcher = self._on_topic_presence  # one bound method for all topics
        if cfg.presence is not None and cfg.presence_events:
            self._presence_unwatch = cfg.presence.watch(cfg.topic, self._on_presence)

    # -- threads -----------------------------------------------------------

    def _bind_hub(self) -> None:
        # The wake-up and heartbeat timers belong to the hub's loop: (re)made
        # lazily on the loop this broker runs on.
        self._loop = gevent.get_hub().loop
        self._flush_timer = self._beat_timer = None
        self._due = []
        self._pending = 0
        self._flush_soon = False

    def _in_hub_thread(self) -> bool:
        # Cross-thread publishes are handed to the hub's loop (see
        # gstream.threadsafe: gevent primitives are not thread-safe).
        return self._binding.here()

    def _on_foreign(self) -> None:
        if self._pump is None and self._foreign:
            self._pump = gevent.spawn(self._drain_foreign)

    def _drain_foreign(self) -> None:
        try:
            while self._foreign:
                topic, event = self._foreign.popleft()
                if not self._closed:
                    try:
                        if topic is None:
                            self._publish_here(event)
                        else:
                            self._publish_topic(topic, event)
                    except BackplaneUnavailable as exc:
                        # The thread that published is long gone: count and log.
                        self._stats["foreign_failed"] += 1
                        log.warning("publish from a thread lost: %s", exc)
        finally:
            self._pump = None

    # -- publishing --------------------------------------------------------

    def publish(self, event: Event | str, topic: str | None = None, *,
                wait_for_id: float | None = None) -> str | None:
        """Send ``event`` to every matching subscriber; return its id (None if not known yet).

        ``topic`` names a topic for multi-topic streams (docs/topics.md); None
        (or the broker's own ``config.topic``) is the default topic, served
        exactly as a single-topic broker. For another topic the returned id is
        the topic position (a broker-wide number in memory, the Redis stream id
        with a durable backplane); a publisher-given id is not sent to topic
        streams, whose ``id:`` is their cursor.

        A ``str`` is sent as a plain message. Without an id, the broker
        assigns the next one of this topic (monotonic). Called from a native
        thread, the event is queued for the hub's thread and ``None`` is
        returned at once (the id is assigned there, in delivery order).

        With a durable backplane (Redis), the id is always the one the
        backplane assigns (a publisher-given id is ignored), and delivery,
        here too, follows asynchronously through the backplane, in the same
        order in every process. ``publish`` then returns as soon as the
        event is queued, with None (the backplane's ``publish_wait``, 0 by
        default); ``wait_for_id=seconds`` waits up to that long for the id
        (None again if Redis has not numbered it by then: still accepted).
        Without a durable backplane ``wait_for_id`` is ignored.

        Raises:
            BrokerClosed: after :meth:`close`.
            BackplaneUnavailable: the backplane did not accept the event
                (nothing was delivered anywhere).
            TopicError: ``topic`` is not a valid topic name.
        """
        if self._closed:
            raise BrokerClosed("broker is closed")
        if isinstance(event, str):
            event = Event(data=event)
        if topic == self.config.topic:
            topic = None
        elif topic is not None:
            check_topic(topic)
        if not self._in_hub_thread():
            if len(self._foreign) >= self.config.foreign_queue:
                try:
                    self._foreign.popleft()
                    self._stats["foreign_dropped"] += 1
                except IndexError:  # drained by the hub meanwhile
                    pass
            self._foreign.append((topic, event))
            self._stats["foreign"] += 1
            self._binding.call_soon(self._on_foreign)
            return None
        if topic is not None:
            return self._publish_topic(topic, event, wait_for_id)
        return self._publish_here(event, wait_for_id)

    def publish_many(self, events: Sequence[Event | str], topic: str | None = None, *,
                     wait_for_id: float | None = None) -> list[str | None]:
        """Publish ``events`` in order; return their ids (as :meth:`publish`).

        With a durable backplane they travel in one pipeline and one wait
        (the way to publish a burst fast); all are accepted or none is.
        Called from a native thread, each is queued as :meth:`publish` does.

        Raises:
            BrokerClosed: after :meth:`close`.
            BackplaneUnavailable: the backplane did not accept them.
        """
        if self._closed:
            raise BrokerClosed("broker is closed")
        batch = [Event(data=e) if isinstance(e, str) else e for e in events]
        if topic == self.config.topic:
            topic = None
        elif topic is not None:
            check_topic(topic)
        if self._durable is None or not self._in_hub_thread():
            return [self.publish(e, topic) for e in batch]
        ids = self._durable.append_many(self.config.topic if topic is None else topic, batch,
                                        wait_for_id=wait_for_id)
        self._stats["published"] += len(batch)
        return ids

    def _publish_here(self, event: Event, wait_for_id: float | None = None) -> str | None:
        if self._durable is not None:
            # Delivery comes back through the backplane's reader, in the
            # global order, exactly once (never also delivered here).
            event_id = self._durable.append(self.config.topic, event, wait_for_id=wait_for_id)
            self._stats["published"] += 1
            return event_id
        if event.id is None or not truncate_field(event.id):
            event = replace(event, id=str(self._next_id))
            self._next_id += 1
        self._stats["published"] += 1
        self._backplane.publish(self.config.topic, event, encode(event))
        return event.id

    def _deliver_local(self, event: Event, frame: bytes, *, may_block: bool = True) -> int:
        """Queue ``frame`` for every local subscriber whose filter accepts it.

        Followers of the shared batch get it with one append for all of them;
        the others one by one: drop-oldest subscribers are served first and
        never wait; full block-mode subscribers then share one deadline of
        ``block_timeout``, so one publish never waits longer than that in total.
        """
        name = event.event_name
        self._seq += 1
        self._history.append(self._seq, truncate_field(event.id or ""), name, frame)
        waiting: list[_Subscriber] = []
        count = 0
        stats = self._stats
        direct = tuple(self._direct)
        if self._followers:
            # Followers: one append for all of them, one pass per batch to wake them.
            batch = self._batch
            batch.append(frame)
            count = len(self._followers)
            if self._fwait:
                self._mark_followers()
            if self._base + len(batch) > self._limit:
                self._overflow()
        for sub in direct:
            if sub.names is not None and name not in sub.names:
                continue
            items = sub.items
            if len(items) >= sub.capacity:
                if sub.block and may_block:
                    waiting.append(sub)
                    continue
                sub.dropped += 1
                sub.missed += 1
                stats["dropped"] += 1
                del items[0]  # drop-oldest (O(capacity), only for a reader that lags)
            items.append(frame)
            if sub.parked is not None and not sub.due:
                self._wake(sub)
            count += 1
        if waiting:
            count += self._wait_for_room(waiting, frame)
        stats["enqueued"] += count
        self._burst_check()
        if self._topics_used and self.config.topic:
            # Multi-topic streams naming the default topic (or a matching pattern).
            count += self._deliver_topic(self.config.topic, event, event.id)
        return count

    def _burst_check(self) -> None:
        if self._due:
            self._pending += 1
            if self._pending >= MAX_BATCH and not self._flush_soon:
                # A long burst: wake the readers before the publisher's next
                # turn so the first events are not held back by the last.
                self._flush_soon = True
                self._loop.run_callback(self._flush_due)

    # -- topics (multi-topic streams; docs/topics.md) --------------------------

    def _publish_topic(self, topic: str, event: Event, wait_for_id: float | None = None) -> str | None:
        self._stats["published"] += 1
        if self._durable is not None:
            # Delivered when the backplane's reader hands it to the topic's
            # sink (only while a local stream subscribes to the topic).
            return self._durable.append(topic, event, wait_for_id=wait_for_id)
        self._topics_used = True
        return self._fan_topic(topic, event, None)[0]

    def _deliver_topic(self, topic: str, event: Event, position: str | None) -> int:
        """Queue ``event`` of ``topic`` for the multi-topic streams it reaches."""
        return self._fan_topic(topic, event, position)[1]

    def _fan_topic(self, topic: str, event: Event, position: str | None) -> tuple[str, int]:
        """Queue ``event`` of ``topic`` for its streams; return its position and how many.

        The frame body (``event: <topic>`` and the data) is encoded once; each
        stream's frame is its own ``id:`` line (its cursor) and that body.
        """
        name = event.event_name
        body = encode(Event(data=event.data, name=event_type(topic, name), retry=event.retry))
        reg = self._topics
        if self._durable is None or position is None:
            position = str(reg.append(topic, body))
        count = 0
        tail = b"\n" + body
        if not reg.patterns:
            rec = reg.records.get(topic)
            if rec is not None and rec.members:
                # The common case inlined: one selector, the part encoded once.
                part = f"{topic}={position}".encode()
                stats = self._stats
                for view in tuple(rec.members.values()):
                    parts = view.parts
                    parts[view.selectors.index(topic)] = part
                    if view.names is not None and name not in view.names:
                        continue  # filtered out; the next frame's cursor carries the move
                    sub = view.sub
                    if sub.ended or sub.final is not None:
                        continue
                    items = sub.items
                    if len(items) >= sub.capacity:  # topic streams are always drop-oldest
                        sub.dropped += 1
                        sub.missed += 1
                        stats["dropped"] += 1
                        del items[0]
                    items.append(_CURSOR_ID + b";".join(parts) + tail)
                    self._wake(sub)
                    count += 1
        else:
            merged: dict[int, tuple[_View, list[str]]] = {}
            for sel, view in reg.targets(topic):
                merged.setdefault(id(view), (view, []))[1].append(sel)
            for view, sels2 in merged.values():
                count += self._queue_topic(view, sels2, position, tail, name)
        if count:
            self._stats["enqueued"] += count
            self._burst_check()
        return position, count

    def _queue_topic(self, view: _View, sels: Sequence[str], position: str, tail: bytes,
                     name: str) -> int:
        parts = view.parts
        for sel in sels:
            parts[view.selectors.index(sel)] = f"{sel}={position}".encode()
        if view.names is not None and name not in view.names:
            return 0  # filtered out; the next frame's cursor carries the move
        sub = view.sub
        if sub.ended or sub.final is not None:
            return 0
        frame = _CURSOR_ID + b";".join(parts) + tail
        items = sub.items
        if len(items) >= sub.capacity:  # topic streams are always drop-oldest
            sub.dropped += 1
            sub.missed += 1
            self._stats["dropped"] += 1
            del items[0]
        items.append(frame)
        self._wake(sub)
        return 1

    def _allowed(self, environ: Environ, topic: str) -> bool:
        hook = self.config.authorize
        if hook is None:
            return True
        try:
            return bool(hook(environ, topic))
        except Exception:  # a broken hook denies, it does not crash the stream
            log.exception("authorize hook failed for topic %r; denying it", topic)
            return False

    def _hold_sink(self, topic: str) -> _TopicSink:
        # Durable backplane: the topic is read from Redis while a stream uses it.
        sink = self._topic_sinks.get(topic)
        if sink is None:
            sink = self._topic_sinks[topic] = _TopicSink(self, topic)
            sink.users += 1
            try:
                self._backplane.attach(topic, sink)  # may yield
            except Exception:
                sink.ready.set()
                self._release_sink(sink)
                raise
            sink.ready.set()
        else:
            sink.users += 1
        return sink

    def _release_sink(self, sink: _TopicSink) -> None:
        sink.users -= 1
        if sink.users <= 0 and self._topic_sinks.get(sink.topic) is sink:
            del self._topic_sinks[sink.topic]
            self._backplane.detach(sink.topic, sink)

    def _drop_view(self, sub: _Subscriber) -> None:
        view = self._views.get(sub.key)
        if view is None or view.sub is not sub:
            return
        del self._views[sub.key]
        watches = self._presence_watches
        for sel in view.selectors:
            self._topics.leave(sel, sub.key, view)
            sink = self._topic_sinks.get(sel)
            if sink is not None:
                self._release_sink(sink)
            if watches and sel in watches:
                self._presence_unwatch_idle(sel)

    def _stream_topics(self, environ: Environ, values: list[str], names: list[str],
                       capacity: int, sid: str, principal: str
                       ) -> tuple[str, list[tuple[str, str]], Any]:
        cfg = self.config
        durable = self._durable
        try:
            selectors = parse_selectors(values, cfg.max_topics)
        except TopicError as exc:
            return "400 Bad Request", list(_TEXT), [f"{exc}\n".encode()]
        if durable is not None:
            if any(is_pattern(sel) for sel in selectors):
                return "400 Bad Request", list(_TEXT), [
                    b"topic patterns need the in-memory backplane (docs/topics.md)\n"]
            if not isinstance(durable, TopicHistory):
                return "500 Internal Server Error", list(_TEXT), [
                    b"this backplane cannot serve topic streams\n"]
        allowed = [sel for sel in selectors if self._allowed(environ, sel)]
        denied = [sel for sel in selectors if sel not in allowed]
        if not allowed:
            return "403 Forbidden", list(_TEXT), [b"no topic allowed\n"]
        raw = last_event_id(environ, MAX_CURSOR + 1)
        try:
            cursor = parse_cursor(raw, allowed) if raw else {}
        except TopicError as exc:
            return "400 Bad Request", list(_TEXT), [f"{exc}\n".encode()]
        self._topics_used = True
        held: list[_TopicSink] = []
        if durable is not None:
            try:
                for sel in allowed:
                    if sel != cfg.topic:
                        sink = self._hold_sink(sel)  # may yield
                        held.append(sink)
                        if sink.ready.is_set() and durable.position(sel) is None:
                            # Redis did not answer (within its socket_timeout):
                            # the others would each wait as long; 503 now.
                            raise BackplaneUnavailable(f"cannot attach topic {sel!r}")
                for sink in held:
                    sink.ready.wait(_durable_wait(durable))
                for sel, pos in cursor.items():
                    if durable.catch_up(sel, pos) is False:  # may yield
                        raise BackplaneUnavailable(f"cannot read topic {sel!r}")
            except BackplaneUnavailable:
                for sink in held:
                    self._release_sink(sink)
                return self._busy(b"event history unavailable\n")
            if self._closed:
                for sink in held:
                    self._release_sink(sink)
                return "503 Service Unavailable", list(_TEXT), [b"broker closed\n"]

        # Atomic from here to the bounds: cap, eviction, registration.
        key = self._admit(sid, principal)
        if key is None:
            for sink in held:
                self._release_sink(sink)
            return self._busy(b"too many subscribers\n")
        # names=frozenset(): the default topic's own loop never serves this
        # stream; its frames come through _deliver_topic with its cursor.
        sub = _Subscriber(self, key, sid, principal, frozenset(), False, capacity)
        refused: list[str] = []
        if cfg.presence is not None:  # presence hook: one join per concrete topic
            allowed, refused = self._presence_join_topics(sub, environ, allowed)
            for sel in refused:  # served like an unauthorized topic: not at all
                gone = self._topic_sinks.get(sel)
                if gone is not None:
                    self._release_sink(gone)
            if not allowed:
                self._stats["rejected"] += 1
                return self._busy(b"presence refused\n")
            cursor = {sel: pos for sel, pos in cursor.items() if sel in allowed}
        view = _View(sub, allowed, frozenset(names) if names else None)
        self._subs[key] = sub
        self._direct[sub] = None
        self._views[key] = view
        _register(sub, environ)
        try:
            for sel in allowed:
                self._topics.join(sel, key, view)
        except TopicError as exc:  # too many distinct patterns
            self._end(sub, b"")
            self._unregister(sub)
            return self._busy(f"{exc}\n".encode())
        # The sinks in ``held`` belong to the view now: _drop_view releases them.
        bounds = self._topic_bounds(allowed)
        if bounds is None:
            self._end(sub, b"")
            self._unregister(sub)
            return self._busy(b"event history unavailable\n")
        view.set_positions(bounds)
        prelude = [OPEN_COMMENT]
        if cfg.retry > 0:
            prelude.append(encode_retry(cfg.retry))
        if denied or refused:
            report: dict[str, list[str]] = {"topics": denied + refused}
            if refused:
                report["presence_refused"] = refused
            data = json.dumps(report, separators=(",", ":"))
            prelude.append(encode(Event(data=data, name=DENIED_EVENT)))
        replay = self._replay_topics(view, cursor, bounds)  # may yield (durable)
        if replay is None:
            self._end(sub, b"")
            self._unregister(sub)
            return self._busy(b"event history unavailable\n")
        prelude.extend(replay)
        prelude.append(b"id: " + encode_cursor(bounds).encode() + b"\n\n")
        return "200 OK", list(SSE_HEADERS), _Body(sub, b"".join(prelude))

    def _topic_bounds(self, selectors: list[str]) -> dict[str, str] | None:
        """Where each selector's live delivery starts (read without yielding)."""
        if self._durable is None:
            last = str(self._topics.last)
            return dict.fromkeys(selectors, last)
        history = cast(TopicHistory, self._durable)
        out: dict[str, str] = {}
        for sel in selectors:
            pos = history.position(sel)
            if pos is None:
                return None
            out[sel] = pos
        return out

    def _reset_frame(self, sel: str, pos: str, reason: str, latest: str) -> bytes:
        self._stats["resets"] += 1
        data = json.dumps({"topic": sel, "last_event_id": pos, "reason": reason,
                           "latest_id": latest}, separators=(",", ":"))
        return encode(Event(data=data, name=RESET_EVENT))

    def _replay_topics(self, view: _View, cursor: dict[str, str],
                       bounds: dict[str, str]) -> list[bytes] | None:
        """Frames a resuming topic stream missed, each with its cursor; None: history unreadable."""
        cur = {sel: cursor.get(sel, bounds[sel]) for sel in view.selectors}
        names = view.names
        frames: list[bytes] = []
        if self._durable is None:
            reg = self._topics
            ok: dict[str, int] = {}
            for sel, pos in cursor.items():
                num = int(pos) if pos.isdigit() else -1
                status = str(reg.status(sel, num) if num >= 0 else ReplayStatus.UNKNOWN)
                if status == ReplayStatus.OK:
                    ok[sel] = num
                else:
                    frames.append(self._reset_frame(sel, pos, str(status), bounds[sel]))
                    cur[sel] = bounds[sel]
            for hits, entry in reg.since(ok):
                for sel in hits:
                    cur[sel] = str(entry.num)
                if names is not None and _type_name(entry.topic, entry.body) not in names:
                    continue
                frames.append(b"id: " + encode_cursor(cur).encode() + b"\n" + entry.body)
        else:
            history = cast(TopicHistory, self._durable)
            for sel, pos in cursor.items():
                if pos == bounds[sel]:
                    continue
                status, events = history.events_between(sel, pos, bounds[sel])  # may yield
                if status == ReplayStatus.UNAVAILABLE:
                    return None
                if status != ReplayStatus.OK:
                    frames.append(self._reset_frame(sel, pos, str(status), bounds[sel]))
                    cur[sel] = bounds[sel]
                    continue
                for event in events:
                    cur[sel] = event.id or cur[sel]
                    name = event.event_name
                    if names is not None and name not in names:
                        continue
                    body = encode(Event(data=event.data, name=event_type(sel, name), retry=event.retry))
                    frames.append(b"id: " + encode_cursor(cur).encode() + b"\n" + body)
        replayed = sum(1 for f in frames if f.startswith(b"id: "))
        self._stats["replayed"] += replayed
        return frames

    def _admit(self, sid: str, principal: str) -> str | None:
        """Pick the new stream's key, evicting the caller's previous stream; None at the cap."""
        cfg = self.config
        key = sid
        self._replaced = None
        incumbent = self._subs.get(sid)
        replacing = incumbent is not None and bool(principal) and incumbent.principal == principal
        if incumbent is not None and not replacing:
            while key in self._subs:  # unrelated collision: coexist
                key = f"{sid}#{secrets.token_hex(4)}"
        if cfg.max_subscribers and not replacing and len(self._subs) >= cfg.max_subscribers:
            self._stats["rejected"] += 1
            return None
        if replacing:
            assert incumbent is not None
            self._stats["evicted"] += 1
            self._end(incumbent, self._final(EVICTED_EVENT, "replaced by a newer stream"))
            self._replaced = incumbent
        return key

    def _wait_for_room(self, waiting: list[_Subscriber], frame: bytes) -> int:
        deadline = time.monotonic() + self.config.block_timeout
        count = 0
        for sub in waiting:
            while not sub.ended and len(sub.items) >= sub.capacity:
                remaining = deadline - time.monotonic()
                room = sub.room
                assert room is not None
                room.clear()
                if remaining <= 0 or not room.wait(remaining):
                    break
            if sub.ended or sub.final is not None:
                continue  # gone, or ended meanwhile (the stall check, a shutdown)
            if len(sub.items) >= sub.capacity:
                self._cut_loose(sub)
                continue
            sub.items.append(frame)
            self._wake(sub)
            count += 1
        return count

    # -- waking readers ----------------------------------------------------

    def _wake(self, sub: _Subscriber) -> None:
        """Queue ``sub``'s reader for the next batched wake-up (if it sleeps)."""
        if sub.due or sub.parked is None:
            return  # already queued, or running: it looks at its queue before sleeping
        sub.due = True
        self._due.append(sub)
        if len(self._due) == 1:
            self._arm_flush()

    def _arm_flush(self) -> None:
        """Start the zero-delay wake-up timer (the first reader of a batch is due)."""
        timer = self._flush_timer
        if timer is None:
            timer = self._flush_timer = self._loop.timer(0.0)
        if not timer.active:
            timer.start(self._flush_due)

    def _flush_due(self) -> None:
        # Runs in the hub: switch to each reader in turn; each one writes
        # what it has queued and switches back here when it sleeps again.
        due, self._due = self._due, []
        self._pending = 0
        self._flush_soon = False
        for sub in due:
            sub.due = False
            waiter = sub.parked
            if waiter is not None:
                try:
                    waiter.switch(None)
                except Exception:  # never let one reader break the others
                    log.exception("waking subscriber %r failed", sub.key)
        if self._batch:
            self._trim()

    def _start_heartbeats(self) -> None:
        hb = self.config.heartbeat_interval
        wt = self.config.write_timeout
        if (hb is None and wt is None) or (self._beat_timer is not None and self._beat_timer.active):
            return
        # Checking four times per interval sends each heartbeat after 1 to
        # 1.25 intervals of silence, and closes a stalled stream after 1 to
        # 1.25 write timeouts.
        period = min(x for x in (hb, wt) if x is not None) / 4
        if self._beat_timer is None:
            self._beat_timer = self._loop.timer(period, period, ref=False)
        self._beat_timer.start(self._heartbeats)

    def _heartbeats(self) -> None:
        if (not self._subs and not self._ending) or self._closed:
            if self._beat_timer is not None:
                self._beat_timer.stop()  # restarted by the next subscriber
            return
        now = time.monotonic()
        hb = self.config.heartbeat_interval
        wt = self.config.write_timeout
        limit = now - hb if hb is not None else -1.0
        stall = now - wt if wt is not None else -1.0
        stalled: list[_Subscriber] = []
        for sub in self._subs.values():
            if sub.parked is not None:
                if not sub.beat and sub.last_write <= limit:
                    sub.beat = True
                    self._wake(sub)
            elif sub.last_write <= stall:
                # Not parked, seen from the loop: its reader is in a write
                # (a greenlet blocked in it, or a detached stream's pending
                # remainder) that began at last_write and has not finished.
                stalled.append(sub)
        if self._ending and wt is not None:
            stalled.extend(s for s in self._ending if s.parked is None and s.last_write <= stall)
        for sub in stalled:
            self._stats["stalled"] += 1
            log.info("closing stream %r: a write to it took over %.1fs (its client stopped "
                     "reading or vanished)", sub.key, wt)
            self._cut_loose(sub, "write timeout")

    def _cut_loose(self, sub: _Subscriber, reason: str = "block timeout exceeded") -> None:
        # Its reader is stuck in a socket write (a block-mode queue stayed
        # full for a whole block timeout, or a write outlasted write_timeout),
        # so a final frame cannot reach it: end the request's greenlet, which
        # closes the connection and unregisters.
        if reason == "block timeout exceeded":
            self._stats["cut"] += 1
            log.info("cutting loose block-mode subscriber %r after %.1fs",
                     sub.key, self.config.block_timeout)
        self._end(sub, self._final(CUT_EVENT, reason))
        self._ending.discard(sub)
        g = sub.greenlet
        if isinstance(g, DetachedStream):
            g.abort(reason)  # its write is pending: close now
        elif g is not None and g is not gevent.getcurrent():
            gevent.kill(g)  # asynchronous: raises GreenletExit in its write

    # -- subscribing -------------------------------------------------------

    def subscribe(self, environ: Environ, start_response: StartResponse) -> Any:
        """WSGI application serving one event stream until the client leaves."""
        status, headers, body = self.stream(environ)
        start_response(status, headers)
        return body

    __call__ = subscribe

    def stream(self, environ: Environ) -> tuple[str, list[tuple[str, str]], Any]:
        """Open a stream for ``environ``: return ``(status, headers, body)``.

        ``body`` is an iterable of bytes with a ``close()`` that always
        unregisters; hand all three to a framework response. Refusals
        (405, 503) come back as short plain-text responses, never exceptions.
        """
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", _TEXT + [("Allow", "GET")], [b"use GET\n"]
        if self._closed:
            return "503 Service Unavailable", list(_TEXT), [b"broker closed\n"]
        if lifecycle_for(environ).shutting_down:
            return self._busy(b"server shutting down\n")
        if not self._in_hub_thread():
            return "500 Internal Server Error", list(_TEXT), [b"broker used from a foreign thread\n"]
        if method == "HEAD":  # headers only: no registration, no eviction
            return "200 OK", list(SSE_HEADERS), []
        cfg = self.config
        query = parse_qsl(environ.get("QUERY_STRING") or "", keep_blank_values=True)
        params: dict[str, str] = {}
        names: list[str] = []
        for k, v in query:
            if k == "event":
                if v and len(names) < MAX_FILTER_NAMES:
                    names.append(truncate_field(v)[:256])
            else:
                params.setdefault(k, v)
        capacity = _parse_buffer(params.get("buffer"))
        if capacity is None:
            capacity = _parse_buffer(_header(environ, "HTTP_X_SSE_BUFFER"))
        capacity = min(max(capacity or cfg.default_buffer, 1), cfg.max_buffer)
        sid = params.get("subscriber_id") or _header(environ, "HTTP_X_SUBSCRIBER_ID") or ""
        sid = _cut_utf8(truncate_field(sid), cfg.max_subscriber_id) or secrets.token_hex(16)
        block = cfg.allow_client_slow_mode and (
            params.get("slow") == "block" or environ.get("HTTP_X_SSE_SLOW") == "block")
        principal = self._principal(environ)
        topics = [v for k, v in query if k == "topic"]
        if topics:
            # '+' is a topic character and a name never holds a space: an
            # unescaped '+' in ?topic= is the name's own (docs/topics.md).
            topics = [v for k, v in parse_qsl(environ["QUERY_STRING"].replace("+", "%2B"),
                                              keep_blank_values=True) if k == "topic"]
        if topics:
            return self._stream_topics(environ, topics, names, capacity, sid, principal)
        if cfg.authorize is not None and not self._allowed(environ, cfg.topic):
            return "403 Forbidden", list(_TEXT), [b"topic not allowed\n"]
        last_id = last_event_id(environ)
        if last_id and self._durable is not None:
            # May yield: must come before the atomic section below.
            self._durable.catch_up(cfg.topic, last_id)
            if self._closed:
                return "503 Service Unavailable", list(_TEXT), [b"broker closed\n"]

        # From here to the end of the method nothing yields: the cap check,
        # the eviction, the registration and the history snapshot are atomic.
        key = self._admit(sid, principal)
        if key is None:
            return self._busy(b"too many subscribers\n")
        sub = _Subscriber(self, key, sid, principal, frozenset(names) if names else None,
                          block, capacity)
        self._subs[key] = sub
        self._direct[sub] = None
        _register(sub, environ)
        prelude = [OPEN_COMMENT]
        if cfg.retry > 0:
            prelude.append(encode_retry(cfg.retry))
        replay = self._replay(last_id, sub)
        if replay is None:
            # The shared history is unreachable: refuse rather than reset, so
            # the client retries later and still resumes without a gap.
            self._end(sub, b"")
            self._unregister(sub)
            return self._busy(b"event history unavailable\n")
        prelude.extend(replay)
        refused = self._presence_join(sub, environ) if cfg.presence is not None else None
        if refused is not None:  # presence hook
            self._end(sub, b"")
            self._unregister(sub)
            if refused.reason in _PRESENCE_INPUT:
                # Not a capacity limit: the same request would be refused again,
                # so no 503 (which clients retry), but what is wrong with it.
                return "400 Bad Request", list(_TEXT), [f"{refused}\n".encode()]
            return self._busy(b"presence refused\n")
        return "200 OK", list(SSE_HEADERS), _Body(sub, b"".join(prelude))

    def _busy(self, reason: bytes) -> tuple[str, list[tuple[str, str]], Any]:
        headers = _TEXT + [("Retry-After", str(self.config.retry_after))]
        return "503 Service Unavailable", headers, [reason]

    def _principal(self, environ: Environ) -> str:
        hook = self.config.principal
        if hook is None:
            return ""
        try:
            value = hook(environ)
        except Exception:  # a broken hook must not turn into eviction
            log.exception("principal hook failed; treating the caller as unknown")
            return ""
        return str(value)[:1024] if value else ""

    def _replay(self, last_id: str, sub: _Subscriber) -> list[bytes] | None:
        names = sub.names
        accept = None if names is None else names.__contains__
        result = self._history.since(last_id, accept)
        status: str = result.status
        frames = result.frames
        latest = self._history.last_id
        if status in (ReplayStatus.UNKNOWN, ReplayStatus.EXPIRED) and self._durable is not None:
            # Not in this process's window: the shared log may have it. The
            # backplane reads its bound synchronously (we are registered and
            # have not yielded since), so replay + live queue have no gap.
            durable = self._durable.history_since(self.config.topic, last_id, accept)
            status, frames = durable.status, durable.frames
            latest = durable.latest_id or latest
        # A backplane answers a ReplayStatus or its plain string: they compare equal.
        if status == ReplayStatus.FRESH:
            return []
        if status == ReplayStatus.OK:
            self._stats["replayed"] += len(frames)
            return frames
        if status == ReplayStatus.UNAVAILABLE:
            return None
        self._stats["resets"] += 1
        data = json.dumps({"last_event_id": last_id[:256], "reason": str(status),
                           "latest_id": latest}, separators=(",", ":"))
        return [encode(Event(data=data, name=RESET_EVENT, id=latest))]

    def _final(self, name: str, reason: str) -> bytes:
        return encode(Event(data=reason, name=name, retry=self.config.retry))

    def _run(self, sub: _Subscriber, prelude: bytes) -> Generator[bytes, None, None]:
        # Runs in the request's greenlet; every yield is written at once by
        # the server. The server stops iterating when the client is gone.
        # (Under gstream's server the handler detaches after the prelude and
        # the rest is served by gstream.detached, through _take.)
        sub.greenlet = gevent.getcurrent()
        yield prelude
        del prelude  # not kept alive for the life of an idle stream
        sub.last_write = time.monotonic()
        self._start_heartbeats()
        items = sub.items
        while True:
            if not items and sub.final is None and not sub.beat:
                # Sleep until _flush_due switches here. A Waiter rather
                # than an Event with a timeout: nothing per-stream stays
                # armed while idle, and the saved stack is shallower.
                waiter = sub.parked = Waiter()
                self._follow(sub)
                try:
                    waiter.get()
                finally:
                    sub.parked = None
            data, last = self._take(sub)
            if data:
                yield data
            if last:
                return

    def _take(self, sub: _Subscriber) -> tuple[bytes, bool]:
        """The frames due to ``sub`` now, joined (a heartbeat if asked and none
        is queued), and whether the stream ends after them."""
        if sub.start >= 0:
            return self._take_batch(sub)
        items = sub.items
        if not items and sub.final is None:
            if sub.parked is not None:
                self._follow(sub)
            if sub.beat:
                sub.beat = False
                sub.last_write = time.monotonic()
                return HEARTBEAT, False
            return b"", False
        sub.beat = False  # frames are about to go: they reset the idle time
        parts: list[bytes] = []
        if sub.missed:
            parts.append(encode(Event(data=json.dumps({"missed": sub.missed}, separators=(",", ":")),
                                      name=MISSED_EVENT)))
            sub.missed = 0
        n = len(items)
        parts.extend(items)
        items.clear()
        if sub.room is not None:
            sub.room.set()
        sub.delivered += n
        self._stats["delivered"] += n
        if sub.final is not None:
            parts.append(sub.final)
            return b"".join(parts), True
        sub.last_write = time.monotonic()
        if sub.parked is not None:
            self._follow(sub)  # a detached stream, emptied: it may share batches again
        return (parts[0] if len(parts) == 1 else b"".join(parts)), False

    # -- the shared batch (followers; docs/broker.md, "One join per batch") ---

    def _follow(self, sub: _Subscriber) -> None:
        """Make ``sub`` a follower if it takes every event the same way, idle, with nothing queued."""
        if (sub.start >= 0 or sub.names is not None or sub.block or sub.items or sub.missed
                or sub.final is not None or sub.parked is None or sub not in self._direct):
            return
        del self._direct[sub]
        end = self._base + len(self._batch)
        sub.start = end
        self._followers[sub] = None
        if end + sub.capacity < self._limit:
            self._limit = end + sub.capacity
        self._await(sub)

    def _await(self, sub: _Subscriber) -> None:
        # Every follower not due waits in _fwait for the next frame (a frame
        # drains the list). Entries of streams that left, or are listed twice,
        # are dropped when they outnumber the followers (a stream that flaps
        # between its own queue and the batch without frames in between).
        fwait = self._fwait
        fwait.append(sub)
        if len(fwait) > 2 * len(self._followers) + 64:
            self._fwait = [s for s in dict.fromkeys(fwait) if s.start >= 0]

    def _unfollow(self, sub: _Subscriber) -> None:
        """Give a follower its untaken batch frames as its own queue; today's path from now on."""
        start = sub.start
        if start < 0:
            return
        sub.start = -1
        del self._followers[sub]
        lo = start - self._base
        if lo < len(self._batch):
            items = sub.items
            items.extend(self._batch[lo:])
            excess = len(items) - sub.capacity
            if excess > 0:  # only from _overflow: one frame, as the per-event path drops it
                del items[:excess]
                sub.dropped += excess
                sub.missed += excess
                self._stats["dropped"] += excess
        if not sub.ended and self._subs.get(sub.key) is sub:
            self._direct[sub] = None

    def _mark_followers(self) -> None:
        # The first frame of a batch: queue every waiting follower for the wake-up.
        waiting, self._fwait = self._fwait, []
        due = self._due
        first = not due
        for sub in waiting:
            if sub.start >= 0 and not sub.due and sub.parked is not None:
                sub.due = True
                due.append(sub)
        if first and due:
            self._arm_flush()

    def _overflow(self) -> None:
        # Some follower may hold more batch frames than its buffer: it leaves
        # (dropping its oldest, counted); the others' lowest limit is refreshed.
        end = self._base + len(self._batch)
        limit = _NO_LIMIT
        for sub in tuple(self._followers):
            if end - sub.start > sub.capacity:
                self._unfollow(sub)
            elif sub.start + sub.capacity < limit:
                limit = sub.start + sub.capacity
        self._limit = limit

    def _trim(self) -> None:
        # After a wake-up: forget the batch frames every follower has taken.
        end = self._base + len(self._batch)
        low = end
        limit = _NO_LIMIT
        for sub in self._followers:
            if sub.start < low:
                low = sub.start
            if sub.start + sub.capacity < limit:
                limit = sub.start + sub.capacity
        self._limit = limit
        if low > self._base:
            del self._batch[:low - self._base]
            self._base = low
        if not self._batch:
            self._joined.clear()

    def _batch_depth(self, sub: _Subscriber) -> int:
        return self._base + len(self._batch) - sub.start

    def _take_batch(self, sub: _Subscriber) -> tuple[bytes, bool]:
        """A follower's batch frames, joined once per distinct start and shared."""
        start = sub.start
        end = self._base + len(self._batch)
        data = b""
        if start < end:
            if self._joined_end != end:
                self._joined.clear()
                self._joined_end = end
            data = self._joined.get(start, b"")
            if not data:
                lo = start - self._base
                data = self._batch[lo] if end - start == 1 else b"".join(self._batch[lo:])
                self._joined[start] = data
            n = end - start
            sub.start = end
            sub.delivered += n
            self._stats["delivered"] += n
        elif sub.beat:
            data = HEARTBEAT
        if data:
            sub.beat = False
            sub.last_write = time.monotonic()
        if sub.parked is None:
            self._unfollow(sub)  # a reader greenlet: it writes now, not parked
        elif start < end:
            self._await(sub)  # the frame that woke it drained _fwait
        return data, False

    def _end(self, sub: _Subscriber, final: bytes) -> None:
        """Stop routing to ``sub`` and let its reader send ``final`` and end."""
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]
        self._direct.pop(sub, None)
        if sub.start >= 0:
            self._unfollow(sub)  # its untaken batch frames, then the final one
        if self._views:
            self._drop_view(sub)
        if sub.final is None:
            sub.final = final
        if not sub.ended:
            self._ending.add(sub)  # until its reader is done (_unregister)
        self._wake(sub)

    def _unregister(self, sub: _Subscriber) -> None:
        self._ending.discard(sub)
        if sub.ended:
            return
        sub.ended = True
        if self._subs.get(sub.key) is sub:
            del self._subs[sub.key]
        self._direct.pop(sub, None)
        if sub.start >= 0:
            self._unfollow(sub)
        if self._views:
            self._drop_view(sub)
        if sub.lifecycle is not None:
            sub.lifecycle.unregister(sub)
        if self._presence_conns:
            self._presence_leave(sub)  # presence hook (issue 22)
        sub.items.clear()
        if sub.room is not None:
            sub.room.set()  # wake a publisher waiting for room
        sub.greenlet = None

    # -- presence hook (issue 22, docs/presence.md) -----------------------

    def _presence_meta(self, environ: Environ) -> Any:
        hook = self.config.presence_meta
        if hook is None:
            return None
        try:
            return hook(environ)
        except Exception:
            log.exception("presence_meta hook failed; listing the subscriber without meta")
            return None

    def _presence_join(self, sub: _Subscriber, environ: Environ) -> PresenceRefused | None:
        """Join presence for the stream's topic; the refusal, if any."""
        cfg = self.config
        assert cfg.presence is not None
        member, meta = sub.principal or f"anon:{sub.key}", self._presence_meta(environ)
        try:
            try:
                self._presence_conns[sub] = cfg.presence.join(cfg.topic, member, meta)
            except PresenceRefused as exc:
                if not self._presence_take_over(sub, exc):
                    raise
                self._presence_conns[sub] = cfg.presence.join(cfg.topic, member, meta)
        except PresenceRefused as exc:
            self._stats["rejected"] += 1
            log.info("topic %r: subscriber %r refused: %s", cfg.topic, sub.key, exc)
            return exc
        return None

    def _presence_join_topics(self, sub: _Subscriber, environ: Environ,
                              selectors: list[str]) -> tuple[list[str], list[str]]:
        """Join presence for each concrete topic of a multi-topic stream (patterns
        are not joined); return the selectors kept and the topics refused."""
        cfg = self.config
        presence = cfg.presence
        assert presence is not None
        member = sub.principal or f"anon:{sub.key}"
        meta = self._presence_meta(environ)
        kept: list[str] = []
        refused: list[str] = []
        conns: list[str] = []
        for sel in selectors:
            if is_pattern(sel):
                kept.append(sel)
                continue
            # Watch before joining: the stream's own join is then an event too.
            watched = cfg.presence_events and sel != cfg.topic
            if watched and sel not in self._presence_watches:
                self._presence_watches[sel] = presence.watch(sel, self._topic_watcher)
            try:
                try:
                    conns.append(presence.join(sel, member, meta))
                except PresenceRefused as exc:
                    if not self._presence_take_over(sub, exc):
                        raise
                    conns.append(presence.join(sel, member, meta))
            except PresenceRefused as exc:
                log.info("topic %r: subscriber %r refused by presence: %s", sel, sub.key, exc)
                refused.append(sel)
                if watched:
                    self._presence_unwatch_idle(sel)
                continue
            kept.append(sel)
        if conns:
            # Compact: one str for one topic, a tuple (8 bytes a topic) for more.
            self._presence_conns[sub] = conns[0] if len(conns) == 1 else tuple(conns)
        return kept, refused

    def _presence_take_over(self, sub: _Subscriber, exc: PresenceRefused) -> bool:
        """At a connection cap, a stream replacing its own older one (same id and
        principal, just evicted) takes its places: the older leaves presence now,
        not when its greenlet ends. True: retry the join."""
        old = self._replaced
        if (old is None or old is sub or old.key != sub.key
                or exc.reason not in ("connections", "local") or old not in self._presence_conns):
            return False
        self._presence_leave(old)
        return True

    def _presence_unwatch_idle(self, topic: str) -> None:
        # The last local stream of ``topic`` is gone: stop watching it.
        if self._topics.member_count(topic) == 0:
            unwatch = self._presence_watches.pop(topic, None)
            if unwatch is not None:
                unwatch()

    def _presence_leave(self, sub: _Subscriber) -> None:
        conns = self._presence_conns.pop(sub, None)
        presence = self.config.presence
        if conns is None or presence is None:
            return
        if isinstance(conns, str):
            presence.leave(conns)
        else:
            for conn in conns:
                presence.leave(conn)

    def _on_presence(self, event: PresenceEvent) -> None:
        # A watcher: queue the event to this process's subscribers, outside
        # the replay history (presence is now, not a past to replay).
        if self._closed:
            return
        name = _presence_name(event)
        frame = encode(Event(data=_presence_data(event), name=name))
        for sub in tuple(self._subs.values()):
            if sub.names is not None and name not in sub.names:
                continue
            self._push(sub, frame)
        if self._topics_used:
            self._topic_presence(event, name)  # multi-topic streams naming the default topic

    def _on_topic_presence(self, event: PresenceEvent) -> None:
        # The watcher of a topic other than the default (multi-topic streams).
        if not self._closed:
            self._topic_presence(event, _presence_name(event))

    def _topic_presence(self, event: PresenceEvent, name: str) -> None:
        """Queue a presence event to the streams naming its topic, typed ``<topic>#<name>``.

        No ``id:`` line: the client's cursor stays where it was (exact resume),
        and the frame is in no replay window.
        """
        rec = self._topics.records.get(event.topic)
        if rec is None or not rec.members:
            return
        frame = encode(Event(data=_presence_data(event), name=event_type(event.topic, name)))
        for view in tuple(rec.members.values()):
            if view.names is not None and name not in view.names:
                continue
            sub = view.sub
            if not sub.ended and sub.final is None:
                self._push(sub, frame)

    def _push(self, sub: _Subscriber, frame: bytes) -> None:
        # Queue a frame outside the history, drop-oldest.
        if sub.start >= 0:
            self._unfollow(sub)
        if len(sub.items) >= sub.capacity:
            sub.dropped += 1
            sub.missed += 1
            self._stats["dropped"] += 1
            del sub.items[0]
        sub.items.append(frame)
        self._wake(sub)

    # -- closing and introspection -----------------------------------------

    def close(self) -> None:
        """Send ``done`` to every subscriber, end the streams, refuse new work.

        Idempotent. Later :meth:`publish` calls raise
        :class:`~gstream.errors.BrokerClosed`; later subscribes get a 503.
        """
        if self._closed:
            return
        self._closed = True
        done = encode(Event(data="[DONE]", type=EventType.DONE, retry=self.config.retry))
        for sub in tuple(self._subs.values()):
            self._end(sub, done)
        if self._presence_unwatch is not None:
            self._presence_unwatch()  # presence hook (issue 22)
        for unwatch in self._presence_watches.values():
            unwatch()
        self._presence_watches.clear()
        # Detach only: a backplane may serve other brokers; its creator closes it.
        self._backplane.detach(self.config.topic, self._deliver_local)
        for sink in tuple(self._topic_sinks.values()):
            self._backplane.detach(sink.topic, sink)
        self._topic_sinks.clear()
        self._foreign.clear()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def subscriber_count(self) -> int:
        """Number of registered subscribers."""
        return len(self._subs)

    @property
    def last_id(self) -> str | None:
        """Id of the latest event delivered by this broker."""
        return self._history.last_id

    def subscribers(self) -> list[dict[str, Any]]:
        """Per-subscriber details: id, mode, buffer, queue depth, drops, deliveries (and topics)."""
        out = []
        for sub in self._subs.values():
            info = sub.info()
            view = self._views.get(sub.key)
            if view is not None and view.sub is sub:
                info["topics"] = list(view.selectors)
                info["events"] = sorted(view.names) if view.names else None
            out.append(info)
        return out

    def topic_subscribers(self, topic: str) -> int:
        """Streams of this process subscribed to ``topic`` (or to the pattern ``topic``) by name."""
        return self._topics.member_count(topic)

    def stats(self) -> BrokerStats:
        """Totals since start (:class:`BrokerCounters`) and the state now; a plain dict."""
        return BrokerStats(**self._stats, topic=self.config.topic, subscribers=len(self._subs),
                           history=len(self._history), last_id=self._history.last_id,
                           closed=self._closed, topics=len(self._topics.records),
                           topic_streams=len(self._views))
