"""Redis backplanes: broker events over Redis Streams, hub broadcasts over pub/sub.

Needs the ``gstream[redis]`` extra. Per process and backplane: one bounded
pool of publish connections and one blocking reader connection, however many
topics and subscribers. Design and fault model: docs/redis.md.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import gevent
from gevent.event import Event as GEvent

from ..errors import BackplaneUnavailable
from ..events import Event, EventType, encode
from . import DeliverSink, ResumeResult
from ._redisutil import (
    DEFAULT_URL,
    TRANSIENT,
    Backoff,
    Outbox,
    Pending,
    StateLog,
    disconnect_client,
    entry_fields,
    is_cluster_url,
    make_client,
    parse_id,
    redact,
    redis,
    require_cooperative_sockets,
    sentinel_url,
    stream_key,
)
from .redis_hub import HubLink, RedisHubBackplane
from .redis_publisher import Publisher

__all__ = ["HubLink", "Publisher", "RedisBackplane", "RedisHubBackplane"]

log = logging.getLogger("gstream.backplane.redis")

#: While Redis is not known to be up (no round trip yet, or the last one
#: failed), a publish waits this long for its own round trip, so that a
#: refused connection, a wrong password or a bad certificate raises at once
#: instead of queueing events for a Redis that is not there.
PROBE_WAIT = 0.05


def _no_such_key(exc: BaseException) -> bool:
    return isinstance(exc, redis.ResponseError) and "no such key" in str(exc).lower()


class RedisBackplane:
    """Carry :class:`~gstream.broker.SSEBroker` topics between processes with Redis Streams.

    Publishing is ``XADD`` (trimmed with ``MAXLEN ~ maxlen``); the entry id
    becomes the event id, so ids are ordered per topic across all processes.
    Publishers never talk to Redis themselves: events go through a bounded
    outbound queue that one writer greenlet sends in pipelines. By default a
    publish returns as soon as the event is queued (None: its id is not
    known yet); ``publish_wait`` (or ``wait_for_id=`` per call) makes it wait
    that long for the id. A stalled Redis cannot stall the application:
    past ``stall_limit`` publishes are refused at once.
    One reader greenlet per backplane runs a blocking ``XREAD`` over every
    attached topic from the last id it delivered, and hands each entry to the
    local brokers (``may_block=False``). The publishing process is served by
    that reader too: every process delivers every event once, in one order.

    A client reconnecting with ``Last-Event-ID`` to any process is resumed
    from the stream (``XRANGE``) when the broker's own window cannot answer.

    One instance can serve many brokers (one topic each) and, through
    :meth:`hub_backplane`, WebSocket hubs. Close it at shutdown.

    Args:
        url: ``redis://[:password@]host[:port][/db]``; ``rediss://`` for TLS
            (``?ssl_cert_reqs=none`` or ``ssl_ca_certs=...`` keyword as in redis-py);
            ``unix:///path.sock``; ``redis+sentinel://host:port[,...]/service[/db]``
            (Sentinel); ``redis+cluster://host:port[,...]`` (Redis Cluster: topics
            become hash tags, one reader per topic). See docs/redis.md.
        sentinels, service: Redis Sentinel without a URL: the sentinels'
            ``(host, port)`` pairs and the service name they monitor (the
            credentials and db of ``url``, if any, apply to the servers).
        prefix: key prefix; the stream of topic ``t`` is ``<prefix>:sse:<t>``
            (``<prefix>:sse:{<t>}`` on a cluster).
        maxlen: approximate number of entries kept per topic stream (the
            replay window shared by all processes).
        block: seconds one ``XREAD`` waits before it is re-issued.
        batch: most entries read per ``XREAD``.
        max_connections: size of the publish/replay connection pool.
        connect_timeout: seconds to connect (and to wait for a pooled connection).
        socket_timeout: seconds a command may take (the reader adds ``block``).
        backoff, backoff_cap: reader reconnect delays, doubled per failure,
            capped, jittered.
        catch_up_timeout: longest a resuming subscriber waits for this
            process to reach an id the client saw on a faster process.
        replay_limit: most entries replayed to one client; further behind,
            it gets a ``gstream.reset``.
        publish_wait: longest :meth:`append` waits for Redis to number an
            event (default 0: not at all); past it the event stays queued
            (accepted, delivered when Redis answers) and ``append`` returns None.
        stall_limit: once a round trip has been unanswered this long (Redis
            stalls), :meth:`append` raises :class:`BackplaneUnavailable` at
            once instead of accepting more events; None: never.
        queue_limit: most events queued for Redis; past it :meth:`append`
            raises :class:`BackplaneUnavailable`.
        redis_kwargs: passed to redis-py's connection pool (TLS files, ...).
    """

    def __init__(self, url: str = DEFAULT_URL, *, prefix: str = "gstream", maxlen: int = 10_000,
                 block: float = 5.0, batch: int = 512, max_connections: int = 8,
                 connect_timeout: float = 2.0, socket_timeout: float = 5.0,
                 backoff: float = 0.05, backoff_cap: float = 5.0,
                 catch_up_timeout: float = 2.0, replay_limit: int = 10_000,
                 publish_wait: float = 0.0, queue_limit: int = 10_000,
                 stall_limit: float | None = 1.0,
                 sentinels: Sequence[tuple[str, int]] | None = None, service: str | None = None,
                 **redis_kwargs: Any) -> None:
        require_cooperative_sockets("RedisBackplane")
        url = sentinel_url(url, sentinels, service)
        self.url = url
        self.publish_wait = max(0.0, float(publish_wait))
        self.prefix = prefix
        self.maxlen = max(1, int(maxlen))
        self.block = max(0.01, float(block))
        self.batch = max(1, int(batch))
        self.catch_up_timeout = max(0.0, float(catch_up_timeout))
        self.replay_limit = max(1, int(replay_limit))
        self._backoff = (backoff, backoff_cap)
        self._client_args = dict(connect_timeout=connect_timeout, **redis_kwargs)
        self._socket_timeout = socket_timeout
        self._pub = make_client(url, max_connections=max_connections,
                                socket_timeout=socket_timeout, **self._client_args)
        self._rd: Any = None
        # Redis Cluster: keys of different slots cannot share one XREAD, so
        # each topic gets its own blocking reader (one per topic, not per client).
        self._cluster = is_cluster_url(url)
        self._topic_readers: dict[str, Any] = {}
        self._node = secrets.token_hex(8)
        self._wake_key = f"{prefix}:wake:{self._node}"
        self._sinks: dict[str, list[DeliverSink]] = {}
        self._keys: dict[bytes, str] = {}
        self._pos: dict[str, str | None] = {}
        self._moved = GEvent()
        self._reader: Any = None
        self._gen = 0
        self._pid = os.getpid()
        self._closed = False
        self._hub_link: HubLink | None = None
        self._pub_state = StateLog(log, f"redis backplane publish {redact(url)}")
        self._outbox = Outbox(self._pub, limit=queue_limit, batch=batch, backoff=backoff,
                              backoff_cap=backoff_cap, state=self._pub_state,
                              retry_accepted=True, what="event", stall_limit=stall_limit)
        self._counts = dict.fromkeys(("appended", "append_failed", "read", "delivered",
                                      "undecodable", "resyncs", "replays"), 0)

    # -- plumbing -------------------------------------------------------------

    def _key(self, topic: str) -> str:
        return stream_key(self.prefix, topic, self._cluster)

    def _check(self) -> None:
        if self._closed:
            raise BackplaneUnavailable("the Redis backplane is closed")
        if os.getpid() != self._pid:
            # Forked after start (gunicorn --preload): the reader greenlet and
            # its socket belong to the parent. redis-py pools reset themselves.
            self._pid = os.getpid()
            self._reader = None
            self._rd = None
            self._topic_readers = {}
            self._outbox.forked()
            if self._sinks:
                self._start_reader()

    def _start_reader(self) -> None:
        if self._cluster:
            self._start_topic_readers()
            return
        if self._reader is None and not self._closed:
            self._gen += 1
            self._rd = make_client(self.url, max_connections=1,
                                   socket_timeout=self.block + self._socket_timeout,
                                   **self._client_args)
            self._reader = gevent.spawn(self._run, self._gen)

    def _start_topic_readers(self) -> None:
        if self._closed:
            return
        if self._rd is None:
            self._gen += 1
            self._rd = make_client(self.url, max_connections=1,
                                   socket_timeout=self.block + self._socket_timeout,
                                   **self._client_args)
        for topic in list(self._sinks):
            reader = self._topic_readers.get(topic)
            if reader is None or reader.dead:
                self._topic_readers[topic] = gevent.spawn(self._run, self._gen, topic)
        self._reader = self._topic_readers or None

    def _wake(self) -> None:
        # The reader may sit in a blocking XREAD that does not include a new
        # topic yet: one entry on its private wake stream returns it at once.
        if self._cluster:
            return  # a new topic gets a reader of its own
        try:
            pipe = self._pub.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1)
            pipe.expire(self._wake_key, 3600)
            pipe.execute()
        except TRANSIENT:
            pass  # the reader is reconnecting; it rereads the topic list anyway

    def _tail(self, topic: str, quiet: bool = False) -> str | None:
        """The topic's last generated id; ``0-0`` if no stream; None if Redis is down."""
        try:
            info = self._pub.xinfo_stream(self._key(topic))
        except TRANSIENT as exc:
            if _no_such_key(exc):
                return "0-0"
            if not quiet:
                    log.warning("redis backplane: cannot read the tail of %r yet (%s); "
                            "the reader will resolve it when Redis is reachable", topic, exc)
            return None
        last = info.get("last-generated-id")
        return last.decode() if isinstance(last, bytes) else str(last)

    # -- the Backplane protocol ----------------------------------------------

    def attach(self, topic: str, deliver: DeliverSink) -> None:
        """Route ``topic``'s events to ``deliver``, starting with those after now."""
        self._check()
        sinks = self._sinks.get(topic)
        if sinks is not None:
            sinks.append(deliver)
            return
        tail = self._tail(topic)  # may yield: register only afterwards
        if topic in self._sinks:
            self._sinks[topic].append(deliver)
            return
        self._sinks[topic] = [deliver]
        self._keys[self._key(topic).encode()] = topic
        self._pos[topic] = tail
        self._start_reader()
        self._wake()

    def detach(self, topic: str, deliver: DeliverSink) -> None:
        """Stop routing ``topic`` to ``deliver``; the last sink gone, stop reading it."""
        sinks = self._sinks.get(topic)
        if not sinks or deliver not in sinks:
            return
        sinks.remove(deliver)
        if not sinks:
            del self._sinks[topic]
            self._keys.pop(self._key(topic).encode(), None)
            self._pos.pop(topic, None)

    def publish(self, topic: str, event: Event, frame: bytes) -> int:
        """Protocol form of :meth:`append`; delivery is asynchronous, so returns 0."""
        self.append(topic, event)
        return 0

    def close(self) -> None:
        """Stop the reader, close the connections; idempotent."""
        if self._closed:
            return
        # Send what was accepted first (bounded): the writer is still running.
        unsent = self._outbox.close(self._socket_timeout)
        if unsent:
            log.warning("redis backplane: closed with %d accepted events never sent to Redis",
                        unsent)
        self._closed = True
        self._sinks.clear()
        self._keys.clear()
        self._pos.clear()
        reader, self._reader = self._reader, None
        readers = list(self._topic_readers.values())
        if not self._cluster and reader is not None:
            readers.append(reader)
        self._topic_readers = {}
        current = gevent.getcurrent()
        gevent.killall([r for r in readers if r is not current], block=True, timeout=2)
        if self._hub_link is not None:
            self._hub_link.close()
        for client in (self._rd, self._pub):
            if client is not None:
                try:
                    disconnect_client(client)
                except Exception:  # closing must not fail the shutdown
                    log.debug("redis backplane: error while disconnecting", exc_info=True)
        self._moved.set()

    # -- the DurableBackplane protocol ----------------------------------------

    def append(self, topic: str, event: Event, *,
               wait_for_id: float | None = None) -> str | None:
        """Queue ``event`` for ``topic``'s stream; return its id if Redis numbered it in time.

        Waits at most ``wait_for_id`` seconds (None: ``publish_wait``, by
        default 0) for the id; while Redis is not known to be up (first
        publish, or the last round trip failed) at least ``PROBE_WAIT``
        (50 ms), so that an unreachable Redis raises here. Returns None when
        Redis has not answered by then: the event is accepted, stays queued and is delivered
        everywhere (this process too), in order, with its Redis id, when
        Redis answers.

        Raises:
            BackplaneUnavailable: Redis is unreachable, stalled longer than
                ``stall_limit`` or refused the entry, or the outbound queue is
                full; the event was not accepted and will be delivered nowhere.
        """
        return self.append_many(topic, (event,), wait_for_id=wait_for_id)[0]

    def append_many(self, topic: str, events: Sequence[Event], *,
                    wait_for_id: float | None = None) -> list[str | None]:
        """Queue ``events`` in order (all or none); one pipeline, one wait.

        Returns their ids, or None for those Redis had not numbered within
        ``wait_for_id`` (None: ``publish_wait``) seconds (accepted, still queued).

        Raises:
            BackplaneUnavailable: as :meth:`append`, for all of them: either
                every event is accepted or none is.
        """
        self._check()
        if not events:
            return []
        key = self._key(topic)
        head = ("XADD", key, "MAXLEN", "~", self.maxlen, "*")
        items = [Pending(head + tuple(entry_fields(e))) for e in events]
        try:
            self._outbox.put(items)
        except BackplaneUnavailable as exc:
            self._counts["append_failed"] += len(items)
            raise BackplaneUnavailable(f"{exc} (topic {topic!r})") from None
        wait = self.publish_wait if wait_for_id is None else max(0.0, float(wait_for_id))
        if not self._outbox.healthy:
            wait = max(wait, PROBE_WAIT)
        self._outbox.wait(items[-1], wait)
        failed = [it.error for it in items if it.error is not None and not it.accepted]
        if failed:
            # A round trip fails as a whole; only a call longer than one
            # pipeline (``batch``) can have a first part appended.
            done = sum(1 for it in items if it.reply is not None)
            self._counts["append_failed"] += len(items) - done
            self._counts["appended"] += done
            split = f" ({done} of {len(items)} appended before the failure)" if done else ""
            raise BackplaneUnavailable(
                f"Redis did not accept the event for topic {topic!r}: {failed[0]}{split}")
        for it in items:
            it.accepted = True  # ids not known yet: the outbox owns them now
        self._counts["appended"] += len(items)
        return [it.reply.decode() if isinstance(it.reply, bytes)
                else (None if it.reply is None else str(it.reply)) for it in items]

    def catch_up(self, topic: str, last_id: str) -> bool:
        """Wait up to ``catch_up_timeout`` until this process delivered ``last_id``.

        False: Redis did not answer (within ``socket_timeout``) whether it exists.
        """
        target = parse_id(last_id)
        if target is None or self._closed:
            return True
        pos = parse_id(self._pos.get(topic))
        if pos is not None and pos >= target:
            return True
        raw_tail = self._tail(topic)
        if raw_tail is None:
            return False
        tail = parse_id(raw_tail)
        if tail is None or target > tail:
            return True  # not an id Redis ever issued: no point waiting
        deadline = time.monotonic() + self.catch_up_timeout
        while not self._closed:
            pos = parse_id(self._pos.get(topic))
            remaining = deadline - time.monotonic()
            if (pos is not None and pos >= target) or remaining <= 0:
                return True
            self._moved.wait(remaining)
        return True

    def history_since(self, topic: str, last_id: str,
                      accept: Callable[[str], bool] | None = None) -> ResumeResult:
        """Frames of the entries after ``last_id`` up to what this process delivered."""
        bound = self._pos.get(topic)  # read before any I/O: see the protocol
        target, upper = parse_id(last_id), parse_id(bound)
        if upper is None:
            return ResumeResult("unavailable", [], None)
        if target is None or target > upper:
            return ResumeResult("unknown", [], bound)
        if target == upper:
            return ResumeResult("ok", [], bound)
        status, entries = self._range(topic, last_id, str(bound), target)
        if status != "ok":
            return ResumeResult(status, [], bound)
        frames: list[bytes] = []
        for entry_id, fields in entries:
            event = self._decode(entry_id, fields)
            if event is not None and (accept is None or accept(event.event_name)):
                frames.append(encode(event))
        self._counts["replays"] += 1
        return ResumeResult("ok", frames, bound)

    # -- the TopicHistory protocol (multi-topic streams) ------------------------

    def position(self, topic: str) -> str | None:
        """The id this process has delivered ``topic`` up to (None: not known yet)."""
        return self._pos.get(topic)

    def events_between(self, topic: str, after: str, upto: str) -> tuple[str, list[Event]]:
        """Events of ``topic`` with ids in ``(after, upto]`` (see :class:`~gstream.backplane.TopicHistory`)."""
        target, upper = parse_id(after), parse_id(upto)
        if upper is None:
            return "unavailable", []
        if target is None or target > upper:
            return "unknown", []
        if target == upper:
            return "ok", []
        status, entries = self._range(topic, after, upto, target)
        if status != "ok":
            return status, []
        events = [e for e in (self._decode(i, f) for i, f in entries) if e is not None]
        self._counts["replays"] += 1
        return "ok", events

    def _range(self, topic: str, after: str, upto: str, target: Any) -> tuple[str, list[Any]]:
        key = self._key(topic)
        try:
            pipe = self._pub.pipeline(transaction=False)
            pipe.xinfo_stream(key)
            pipe.xrange(key, min=f"({after}", max=upto, count=self.replay_limit + 1)
            info, entries = pipe.execute()
        except TRANSIENT as exc:
            if _no_such_key(exc):
                return "expired", []
            log.warning("redis backplane: cannot read history of %r: %s", topic, exc)
            return "unavailable", []
        trimmed = parse_id(info.get("max-deleted-entry-id"))
        if trimmed is None:  # Redis < 7: judge by the oldest entry kept
            first = info.get("first-entry")
            oldest = parse_id(first[0]) if first else None
            if oldest is not None and oldest > target:
                return "expired", []
        elif trimmed > target:
            return "expired", []
        if len(entries) > self.replay_limit:
            return "expired", []
        return "ok", entries

    # -- hub ------------------------------------------------------------------

    def hub_backplane(self) -> RedisHubBackplane:
        """A backplane for one :class:`~gstream.hub.Hub` (``Hub(backplane=...)``).

        Every call gives a new one (one per hub, as the hub protocol wants);
        they all share this backplane's publish pool and one pub/sub
        connection, closed with this backplane.
        """
        if self._hub_link is None:
            self._hub_link = HubLink(self.url, prefix=self.prefix, client=self._pub,
                                     backoff=self._backoff[0], backoff_cap=self._backoff[1],
                                     socket_timeout=self._socket_timeout,
                                     stall_limit=self._outbox.stall_limit, **self._client_args)
        return RedisHubBackplane(link=self._hub_link)

    # -- the reader -------------------------------------------------------------

    def _decode(self, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event | None:
        ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            etype = EventType(int(fields.get(b"t", b"0")))
            retry = fields.get(b"r")
            return Event(data=fields.get(b"d", b"").decode("utf-8", "replace"), type=etype,
                         name=fields.get(b"n", b"").decode("utf-8", "replace"), id=ident,
                         retry=int(retry) if retry else None)
        except (ValueError, TypeError, AttributeError):
            # Not written by gstream: skip it rather than stop the topic.
            self._counts["undecodable"] += 1
            if self._counts["undecodable"] == 1 or self._counts["undecodable"] % 1000 == 0:
                log.warning("redis backplane: skipping undecodable entry %s", ident)
            return None

    def _resync(self, only: str | None = None) -> None:
        """After (re)connecting: resolve unknown positions, detect lost streams."""
        self._counts["resyncs"] += 1
        for topic, pos in list(self._pos.items()):
            if only is not None and topic != only:
                continue
            tail = self._tail(topic, quiet=True)
            if tail is None:
                raise redis.ConnectionError("Redis unavailable during resync")
            if topic not in self._pos:
                continue
            if pos is None:
                self._pos[topic] = tail
            elif parse_id(tail) < parse_id(pos):  # type: ignore[operator]
                # The stream restarted below our position (Redis lost data,
                # or was flushed): read it from the start or we would miss
                # everything until ids pass our old position.
                log.warning("redis backplane: stream of %r restarted (tail %s < last delivered "
                            "%s); reading it from its start", topic, tail, pos)
                self._pos[topic] = "0-0"

    def _run(self, gen: int, only: str | None = None) -> None:
        """The reader: every attached topic, or (Redis Cluster) only the topic ``only``."""
        backoff = Backoff(*self._backoff)
        what = f"redis backplane reader {redact(self.url)}"
        state = StateLog(log, what if only is None else f"{what} topic {only!r}")
        resync = True
        while not self._closed and gen == self._gen:
            if only is not None and only not in self._pos:
                if self._topic_readers.get(only) is gevent.getcurrent():
                    del self._topic_readers[only]  # detached: this reader ends
                return
            try:
                if resync:
                    self._resync(only)
                streams: dict[Any, Any] = {k: self._pos[t] for k, t in self._keys.items()
                                           if self._pos.get(t) is not None
                                           and (only is None or t == only)}
                if only is None:
                    streams[self._wake_key] = "$"
                elif not streams:
                    gevent.sleep(self.block)  # position unknown (cannot happen after a resync)
                    continue
                resp = self._rd.xread(streams, count=self.batch, block=int(self.block * 1000))
            except TRANSIENT as exc:
                if self._closed or gen != self._gen:
                    return
                state.failed(exc)
                resync = True
                if not self._cluster:  # cluster clients replace their node connections
                    try:
                        disconnect_client(self._rd)
                    except Exception:
                        pass
                gevent.sleep(backoff.next())
                continue
            state.ok(lambda: f"; resuming from {dict(self._pos)}")
            backoff.reset()
            resync = False
            if resp and gen == self._gen:  # a stale reader (pre-fork copy) must not deliver
                self._dispatch(resp)

    def _dispatch(self, resp: Any) -> None:
        # XREAD answers a list of [key, entries] (RESP2) or a dict (RESP3).
        items = resp.items() if isinstance(resp, dict) else resp
        for key, entries in items:
            topic = self._keys.get(key if isinstance(key, bytes) else str(key).encode())
            if topic is None:
                continue  # the wake stream, or a topic detached meanwhile
            for entry_id, fields in entries:
                if topic not in self._pos:
                    break
                ident = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                event = self._decode(ident, fields)
                self._counts["read"] += 1
                if event is not None:
                    frame = encode(event)
                    for deliver in tuple(self._sinks.get(topic, ())):
                        try:
                            self._counts["delivered"] += deliver(event, frame, may_block=False)
                        except Exception:  # one broken sink must not stop the topic
                            log.exception("redis backplane: delivery to %r failed", topic)
                self._pos[topic] = ident
        moved, self._moved = self._moved, GEvent()
        moved.set()

    # -- introspection ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and positions: appended, append_failed, read, delivered, ..."""
        out: dict[str, Any] = dict(self._counts)
        out.update(positions=dict(self._pos), reader_running=self._reader is not None,
                   closed=self._closed, queued=len(self._outbox),
                   **{f"outbox_{k}": v for k, v in self._outbox.counts.items()})
        return out
