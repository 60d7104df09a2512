"""The Server-Sent Events user of :mod:`gstream.contrib.locust` (import it from there)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from gevent import GreenletExit

from ...client.sse import SSEClient
from ...errors import Disconnected, DuplicateEvent, HTTPError, MissedEvents
from ...sseparse import ParsedEvent
from ._base import StreamingUser, log

__all__ = ["SSEUser"]

#: Most topics whose sequence one stream tracks (a pattern may match many).
MAX_TRACKED_TOPICS = 10_000

# -- Server-Sent Events -------------------------------------------------------


class _TimedSSEClient(SSEClient):
    """An SSEClient that tells its stream when connections open and end."""

    def __init__(self, stream: _SSEStream, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._stream = stream

    def _connect(self) -> tuple[Any, dict[str, str], bytes]:
        start = time.perf_counter()
        try:
            result = super()._connect()
        except Exception as exc:
            if not self.closed and type(exc).__name__ != "_NoContent":
                self._stream.connect_failed(start, exc)
            raise
        self._stream.opened(start)
        return result

    def _body(self, sock: Any, headers: dict[str, str], rest: bytes) -> Any:
        error: BaseException | None = None
        try:
            yield from super()._body(sock, headers, rest)
        except (OSError, HTTPError) as exc:
            error = exc
            raise
        finally:
            self._stream.ended(error)


class _SSEStream:
    """One event stream of an :class:`SSEUser`: client, reader greenlet, id tracking."""

    def __init__(self, user: SSEUser, url: str, headers: Mapping[str, str],
                 last_event_id: str | None) -> None:
        self.user = user
        self.last_id: int | None = None
        self.topic_last: dict[str, int] = {}
        self.connected = False
        self.first_pending = False
        self.attempt_start = 0.0
        self.lost_at: float | None = None
        self.client = _TimedSSEClient(
            self, url, headers=headers, last_event_id=last_event_id,
            reconnect=user.reconnect, timeout=user.connect_timeout,
            read_timeout=user.read_timeout, retry_default_ms=user.retry_default_ms,
            max_retry_ms=user.max_retry_ms,
        )

    def opened(self, start: float) -> None:
        now = time.perf_counter()
        user, counters = self.user, self.user.counters
        self.connected, self.first_pending, self.attempt_start = True, True, start
        counters.open += 1
        counters.connects += 1
        user.report("connect", (now - start) * 1000.0)
        if self.lost_at is not None:
            counters.reconnects += 1
            user.report("reconnect", (now - self.lost_at) * 1000.0)
            self.lost_at = None

    def connect_failed(self, start: float, exc: BaseException) -> None:
        self.user.counters.errors += 1
        self.user.report("connect", (time.perf_counter() - start) * 1000.0, exception=exc)

    def ended(self, error: BaseException | None) -> None:
        if not self.connected:
            return
        self.connected = False
        counters = self.user.counters
        counters.open -= 1
        if self.client.closed or self.user._stopping:
            return  # the user is stopping: not a disconnect of the server's doing
        counters.disconnects += 1
        self.lost_at = time.perf_counter()
        if error is not None:
            counters.errors += 1
            self.user.report("disconnect", 0.0, exception=Disconnected(str(error) or type(error).__name__))

    def handle(self, event: ParsedEvent) -> None:
        user, counters = self.user, self.user.counters
        size = len(event.data)
        counters.events += 1
        counters.bytes_received += size
        if self.first_pending:
            self.first_pending = False
            user.report("first_event", (time.perf_counter() - self.attempt_start) * 1000.0)
        seq = user.event_id(event)
        if seq is not None:
            last = self.last_id
            if last is not None and seq > last + 1:
                missed = seq - last - 1
                counters.missed += missed
                log.debug("%s: missed %d events between ids %d and %d", self.client.url, missed, last, seq)
                user.report("missed", 0.0, missed, MissedEvents("gap in event ids"))
            elif last is not None and seq <= last:
                counters.duplicates += 1
                user.report("duplicate", 0.0, 1, DuplicateEvent("event id repeated or went back"))
            if last is None or seq > last:
                self.last_id = seq
        found = user.topic_sequence(event)
        if found is not None:
            self.check_topic(*found)
        user.report(user.event_stat_name(event), user.event_latency_ms(event), size)
        user.on_event(event)

    def check_topic(self, topic: str, seq: int) -> None:
        """Per-topic gap and duplicate detection (multi-topic streams)."""
        user, counters = self.user, self.user.counters
        last = self.topic_last.get(topic)
        if last is not None and seq > last + 1:
            missed = seq - last - 1
            counters.missed += missed
            user.topic_missed[topic] = user.topic_missed.get(topic, 0) + missed
            user.report(f"missed {topic}", 0.0, missed, MissedEvents(f"gap in topic {topic}"))
        elif last is not None and seq <= last:
            counters.duplicates += 1
            user.report(f"duplicate {topic}", 0.0, 1, DuplicateEvent(f"repeat in topic {topic}"))
        if (last is None or seq > last) and (
                last is not None or len(self.topic_last) < MAX_TRACKED_TOPICS):
            self.topic_last[topic] = seq

    def run(self) -> None:
        try:
            for event in self.client:
                try:
                    self.handle(event)
                except Exception as exc:
                    self.user._user_error(exc)
        except GreenletExit:
            raise
        except Exception as exc:  # a refusal for good (404, wrong Content-Type...)
            if not self.client.closed:
                log.debug("event stream %s ended: %s", self.client.url, exc)


class SSEUser(StreamingUser):
    """A Locust user that holds Server-Sent Events streams and reports on them.

    On start it opens ``streams`` connections to ``path`` (relative to the
    user's ``host``), each read by a greenlet the user owns; they reconnect
    like ``EventSource`` (honouring ``retry:``, sending ``Last-Event-ID``) and
    report ``connect``, ``first_event``, ``event``, ``missed``, ``duplicate``,
    ``reconnect`` and ``disconnect`` (see :mod:`gstream.locust`). A subclass
    without ``@task`` methods only holds its streams; one with tasks runs them
    while the streams are read. Example::

        class Subscriber(SSEUser):
            path = "/events"

        class Watcher(SSEUser):
            path = "/events"
            streams = 10            # ten idle connections per user

            def on_event(self, event):
                ...                  # your own checks

    Several topics on one stream (docs/topics.md)::

        class Reader(SSEUser):
            path = "/events"
            topics = ["news", "user/42"]   # ?topic=news&topic=user/42
            sequence_field = "seq"         # per-topic gaps from {"seq": n} in the data

    reports a gap in topic ``t`` as ``missed t`` (and counts it in
    :attr:`topic_missed`); override :meth:`topic_sequence` for another scheme.

    Override :meth:`event_id` (numeric id used for gap detection),
    :meth:`event_latency_ms` / ``timestamp_field`` (delivery latency) and
    :meth:`event_stat_name`. Set ``autostart = False`` and call
    :meth:`open_stream` to choose URLs and headers at run time.
    """

    abstract = True
    request_type = "SSE"
    path: str = "/events"
    """The stream's path (or full URL)."""
    streams: int = 1
    """Connections each user opens on start (many idle connections per user are cheap)."""
    headers: Mapping[str, str] = {}
    """Extra request headers."""
    autostart: bool = True
    """Open ``streams`` connections in :meth:`on_start`."""
    reconnect: bool = True
    """Reconnect (with ``Last-Event-ID``) when a stream ends or breaks."""
    connect_timeout: float = 10.0
    """Seconds to connect and read the response head."""
    read_timeout: float | None = None
    """Seconds without a byte (heartbeats count) before a stream is taken for dead."""
    retry_default_ms: int = 1000
    """Reconnection delay until the server sends ``retry:``."""
    max_retry_ms: int = 10_000
    """Upper bound of any reconnection delay."""
    topics: Sequence[str] = ()
    """Topics (or patterns) each stream subscribes to, added to ``path`` as ``topic=`` parameters."""
    sequence_field: str = "seq"
    """JSON field of the event data holding a per-topic sequence number (1, 2, 3, ...)."""

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.sse_streams: list[_SSEStream] = []
        """The user's open streams (their ``client`` is a :class:`gstream.client.SSEClient`)."""
        self.topic_missed: dict[str, int] = {}
        """Events missing per topic, summed over this user's streams."""

    def on_start(self) -> None:
        """Open ``streams`` streams when ``autostart`` (call super() when overriding)."""
        if self.autostart:
            for _ in range(self.streams):
                self.open_stream()

    def open_stream(self, path: str | None = None, *, headers: Mapping[str, str] | None = None,
                    last_event_id: str | None = None) -> SSEClient:
        """Open one more stream (read by an owned greenlet); returns its client."""
        url = self.url_for(path or self.path)
        if self.topics:
            url += ("&" if "?" in url else "?") + urlencode([("topic", t) for t in self.topics])
        stream = _SSEStream(self, url,
                            {**self.headers, **(headers or {})}, last_event_id)
        self.sse_streams.append(stream)
        self.spawn_owned(stream.run)
        return stream.client

    def _close_connections(self) -> None:
        for stream in self.sse_streams:
            stream.client.close()

    def event_id(self, event: ParsedEvent) -> int | None:
        """The event's numeric id for gap detection (default: the SSE id, if all digits)."""
        value = event.last_event_id
        return int(value) if value.isdigit() and event.id_field_seen else None

    def topic_sequence(self, event: ParsedEvent) -> tuple[str, int] | None:
        """``(topic, sequence)`` of an event of a multi-topic stream, for per-topic gaps.

        Default: when :attr:`topics` is set, the topic from the event type
        (``topic`` or ``topic#name``) and the integer ``sequence_field`` of
        JSON data; None for anything else (``gstream.*`` events, other data).
        """
        if not self.topics or event.event.startswith("gstream."):
            return None
        try:
            value = json.loads(event.data)
        except ValueError:
            return None
        seq = value.get(self.sequence_field) if isinstance(value, dict) else None
        if not isinstance(seq, int) or isinstance(seq, bool):
            return None
        return event.event.split("#", 1)[0], seq

    def event_latency_ms(self, event: ParsedEvent) -> float:
        """Delivery latency of ``event`` in ms (default: from ``timestamp_field`` of JSON data)."""
        return self.latency_ms(event.data)

    def event_stat_name(self, event: ParsedEvent) -> str:
        """The statistic name an event is reported under (default ``"event"``)."""
        return "event"

    def on_event(self, event: ParsedEvent) -> None:
        """Called for every event after it was reported (in the stream's greenlet)."""
