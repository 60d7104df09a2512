"""Hub broadcasts between processes over Redis pub/sub (see docs/redis.md).

A :class:`RedisHubBackplane` serves one hub (a
:class:`~gstream.backplane.HubBackplane`); the connections live in a
:class:`HubLink` that the hub backplanes of a process share: one bounded
publish pool, one pub/sub connection, one reader greenlet.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import gevent

from ..errors import BackplaneUnavailable
from ._redisutil import (
    DEFAULT_URL,
    HUB_HEAD,
    HUB_MAGIC,
    TRANSIENT,
    Backoff,
    Outbox,
    Pending,
    StateLog,
    close_pubsub,
    disconnect_client,
    hub_channel,
    hub_envelope,
    make_client,
    redact,
    require_cooperative_sockets,
    sentinel_url,
)

__all__ = ["HubLink", "RedisHubBackplane"]

log = logging.getLogger("gstream.backplane.redis")

Deliver = Callable[[Any], Any]  # (payload: str | bytes) -> bool (False: that hub was full)

_MAGIC = HUB_MAGIC  # the envelope: see _redisutil.hub_envelope
_HEAD = HUB_HEAD


class HubLink:
    """The Redis side shared by a process's hub backplanes.

    ``PUBLISH`` on ``<prefix>:hub:<channel>``; the reader greenlet subscribes
    to every attached channel and hands envelopes from *other* links to the
    hubs here. A publish is handed to the other hubs of the same channel in
    this process directly (the reader drops its own link's envelopes), so no
    hub ever receives a message twice or its own message back.

    ``PUBLISH`` never runs in the broadcasting greenlet: broadcasts go
    through a bounded outbound queue (``queue_limit``) that one writer
    greenlet sends in pipelines, so a stalled Redis never delays the hubs'
    local fan-out.

    Args:
        url: ``redis://[:password@]host[:port][/db]``, ``rediss://`` for TLS.
        prefix: channel prefix.
        client: a ``redis.Redis`` to publish with (shared pool, not closed here).
        block: seconds one wait for messages lasts before it is re-issued.
        backoff, backoff_cap: reader reconnect delays (exponential, capped, jittered).
        queue_limit: most broadcasts waiting for Redis; past it a broadcast
            raises :class:`BackplaneUnavailable`.
        stall_limit: once a ``PUBLISH`` round trip has been unanswered this
            long, broadcasts raise :class:`BackplaneUnavailable` at once
            (local fan-out still done); None: never.
        sentinels, service: Redis Sentinel without a URL, as for
            :class:`~gstream.backplane.redis.RedisBackplane`.
    """

    def __init__(self, url: str = DEFAULT_URL, *, prefix: str = "gstream", client: Any = None,
                 max_connections: int = 8, connect_timeout: float = 2.0,
                 socket_timeout: float = 5.0, backoff: float = 0.05, backoff_cap: float = 5.0,
                 block: float = 5.0, queue_limit: int = 10_000,
                 stall_limit: float | None = 1.0,
                 sentinels: Sequence[tuple[str, int]] | None = None, service: str | None = None,
                 **redis_kwargs: Any) -> None:
        require_cooperative_sockets("the Redis hub backplane")
        url = sentinel_url(url, sentinels, service)
        self.url = url
        self.prefix = prefix
        self.block = max(0.01, float(block))
        self._backoff = (backoff, backoff_cap)
        self._client_args = dict(connect_timeout=connect_timeout, **redis_kwargs)
        self._socket_timeout = socket_timeout
        self._own_client = client is None
        self._pub = client if client is not None else make_client(
            url, max_connections=max_connections, socket_timeout=socket_timeout,
            **self._client_args)
        self._node = os.urandom(8)
        self._wake = f"{prefix}:hubwake:{self._node.hex()}"
        self._sinks: dict[str, list[tuple[object, Deliver]]] = {}
        self._reader: Any = None
        self._gen = 0
        self._pid = os.getpid()
        self._closed = False
        self._pub_state = StateLog(log, f"redis hub backplane publish {redact(url)}")
        self._outbox = Outbox(self._pub, limit=queue_limit, batch=512, backoff=backoff,
                              backoff_cap=backoff_cap, state=self._pub_state,
                              retry_accepted=False, what="broadcast", stall_limit=stall_limit)
        self.counts = dict.fromkeys(("broadcast", "broadcast_failed", "received",
                                     "echoes", "undecodable", "local"), 0)

    def _check(self) -> None:
        if self._closed:
            raise BackplaneUnavailable("the Redis hub link is closed")
        if os.getpid() != self._pid:  # forked: the reader belongs to the parent
            self._pid = os.getpid()
            self._node = os.urandom(8)
            self._reader = None
            self._outbox.forked()
            if self._sinks:
                self._start_reader()

    def _start_reader(self) -> None:
        if self._reader is None and not self._closed:
            self._gen += 1
            self._reader = gevent.spawn(self._run, self._gen)

    def add(self, channel: str, owner: object, deliver: Deliver) -> None:
        """Route ``channel``'s messages from other hubs to ``deliver`` (of ``owner``)."""
        self._check()
        first = channel not in self._sinks
        self._sinks.setdefault(channel, []).append((owner, deliver))
        if first:
            self._start_reader()
            wake = Pending(("PUBLISH", self._wake, b""))
            wake.accepted = True
            try:  # interrupt the reader's wait so it subscribes at once
                self._outbox.put([wake])
            except BackplaneUnavailable:
                pass  # it is reconnecting and will subscribe to everything

    def remove(self, owner: object) -> None:
        """Forget every sink of ``owner``; idempotent."""
        for channel in list(self._sinks):
            kept = [s for s in self._sinks[channel] if s[0] is not owner]
            if kept:
                self._sinks[channel] = kept
            else:
                del self._sinks[channel]

    def publish(self, channel: str, payload: str | bytes, sender: object) -> None:
        """Send ``payload`` to every hub of ``channel`` except ``sender``'s.

        The other hubs of this process get it at once; other processes when
        the writer's ``PUBLISH`` reaches Redis (never waited for here). A
        broadcast queued when Redis turns out to be down is dropped and
        counted (``broadcast_failed``): pub/sub is at-most-once.

        Raises:
            BackplaneUnavailable: Redis is known to be down (a round trip
                failed within the last backoff delay) or the outbound queue
                is full; no other process gets it (the other hubs of this
                process still do).
        """
        self._check()
        item = Pending(("PUBLISH", hub_channel(self.prefix, channel),
                        hub_envelope(self._node, payload)))
        item.accepted = True  # nobody waits for a PUBLISH reply
        try:
            self._outbox.put([item])
        except BackplaneUnavailable as exc:
            self.counts["broadcast_failed"] += 1
            failure: BackplaneUnavailable | None = BackplaneUnavailable(
                f"{exc} (channel {channel!r})")
        else:
            failure = None
            self.counts["broadcast"] += 1
        for owner, deliver in tuple(self._sinks.get(channel, ())):
            if owner is not sender:  # a sibling hub of this process
                self.counts["local"] += 1
                self._call(channel, deliver, payload)
        if failure is not None:
            raise failure

    @staticmethod
    def _call(channel: str, deliver: Deliver, payload: str | bytes) -> None:
        try:
            deliver(payload)
        except Exception:  # one broken hub must not starve the others
            log.exception("redis hub backplane: delivery to %r failed", channel)

    def close(self) -> None:
        """Stop the reader, close owned connections; idempotent."""
        if self._closed:
            return
        self._outbox.close(self._socket_timeout)
        self._closed = True
        self._sinks.clear()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=True, timeout=2)
        if self._own_client:
            try:
                disconnect_client(self._pub)
            except Exception:
                log.debug("redis hub backplane: error while disconnecting", exc_info=True)

    def _run(self, gen: int) -> None:
        backoff = Backoff(*self._backoff)
        state = StateLog(log, f"redis hub backplane reader {redact(self.url)}")
        client = make_client(self.url, max_connections=1,
                             socket_timeout=self.block + self._socket_timeout,
                             **self._client_args)
        pubsub: Any = None
        subscribed: set[str] = set()
        try:
            while not self._closed and gen == self._gen:
                try:
                    # Only this greenlet touches the pub/sub connection.
                    if pubsub is None:
                        pubsub = client.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(self._wake)
                        subscribed = set()
                    wanted = {hub_channel(self.prefix, c) for c in self._sinks}
                    if wanted - subscribed:
                        pubsub.subscribe(*(wanted - subscribed))
                    if subscribed - wanted:
                        pubsub.unsubscribe(*(subscribed - wanted))
                    subscribed = wanted
                    message = pubsub.get_message(timeout=self.block)
                except TRANSIENT as exc:
                    if self._closed or gen != self._gen:
                        return
                    state.failed(exc)
                    close_pubsub(pubsub)
                    pubsub = None
                    gevent.sleep(backoff.next())
                    continue
                state.ok()
                backoff.reset()
                if (message is not None and message.get("type") == "message"
                        and gen == self._gen):  # a stale pre-fork reader must not deliver
                    self._receive(message["channel"], message["data"])
        finally:
            close_pubsub(pubsub)
            disconnect_client(client)

    def _receive(self, raw_channel: Any, data: Any) -> None:
        chan = raw_channel.decode("utf-8", "replace") if isinstance(raw_channel, bytes) \
            else str(raw_channel)
        head = f"{self.prefix}:hub:"
        if not chan.startswith(head) or not isinstance(data, bytes):
            return
        if len(data) < _HEAD or not data.startswith(_MAGIC) or data[10:11] not in (b"t", b"b"):
            self.counts["undecodable"] += 1
            return
        if data[2:10] == self._node:
            self.counts["echoes"] += 1  # handed to this process's hubs by publish()
            return
        body = data[_HEAD:]
        payload: str | bytes = body
        if data[10:11] == b"t":
            try:
                payload = body.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                self.counts["undecodable"] += 1
                return
        self.counts["received"] += 1
        channel = chan[len(head):]
        for _owner, deliver in tuple(self._sinks.get(channel, ())):
            self._call(channel, deliver, payload)

    def stats(self) -> dict[str, Any]:
        """Counters: broadcast, broadcast_failed, received, echoes, local, undecodable, queued."""
        out: dict[str, Any] = dict(self.counts)
        # Broadcasts accepted but dropped by the writer (Redis went down) count as failed.
        out["broadcast_failed"] += self._outbox.counts["lost"]
        out.update(channels=sorted(self._sinks), closed=self._closed, queued=len(self._outbox))
        out.update({f"outbox_{k}": v for k, v in self._outbox.counts.items()})
        return out


class RedisHubBackplane:
    """The backplane of one :class:`~gstream.hub.Hub`, over Redis pub/sub.

    Implements the hub's protocol: ``attach(channel, deliver)``,
    ``broadcast(channel, payload)`` (to the hubs of ``channel`` in other
    processes, and to other hubs of it in this one; never back to this hub,
    which fans out locally itself), ``close()`` (called by ``Hub.stop()``).
    ``str`` payloads arrive as ``str`` (text frames), ``bytes`` as ``bytes``.

    Pub/sub is at-most-once: a broadcast made while another process's reader
    is reconnecting does not reach that process (its reader logs the outage).
    A broadcast that Redis refuses raises :class:`BackplaneUnavailable`.

    Args:
        url: as for :class:`HubLink`; ignored when ``link`` is given.
        link: a shared :class:`HubLink` (e.g. ``RedisBackplane.hub_backplane()``
            passes its own); by default this backplane makes and owns one.
        link_kwargs: passed to :class:`HubLink` when one is made.
    """

    def __init__(self, url: str = DEFAULT_URL, *, link: HubLink | None = None,
                 **link_kwargs: Any) -> None:
        self._owns_link = link is None
        self.link = link if link is not None else HubLink(url, **link_kwargs)

    def attach(self, channel: str, deliver: Deliver) -> None:
        """Route ``channel``'s broadcasts from other hubs to ``deliver``."""
        self.link.add(channel, self, deliver)

    def broadcast(self, channel: str, payload: str | bytes) -> None:
        """Send ``payload`` to the other hubs of ``channel``, in every process.

        Raises:
            BackplaneUnavailable: Redis refused it or is unreachable.
        """
        self.link.publish(channel, payload, self)

    def close(self) -> None:
        """Detach this hub; close the link too if this backplane made it. Idempotent."""
        self.link.remove(self)
        if self._owns_link:
            self.link.close()

    def stats(self) -> dict[str, Any]:
        """The link's counters (shared by the hubs on it)."""
        return self.link.stats()
