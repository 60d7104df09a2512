"""Hub broadcasts between processes over Redis pub/sub (see docs/redis.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import gevent

from ..errors import BackplaneUnavailable
from ._redisutil import DEFAULT_URL, TRANSIENT, Backoff, StateLog, make_client, redact

__all__ = ["RedisHubBackplane"]

log = logging.getLogger("gstream.backplane.redis")

# Envelope: magic, 8-byte origin node id, kind (t = text, b = binary), payload.
_MAGIC = b"G1"
_HEAD = len(_MAGIC) + 8 + 1


class RedisHubBackplane:
    """Carry WebSocket hub broadcasts between processes with Redis pub/sub.

    :meth:`broadcast` ``PUBLISH``es an envelope (origin id, text/binary flag,
    payload) on ``<prefix>:hub:<channel>`` and then calls this process's
    sinks directly; the reader greenlet drops envelopes of its own origin, so
    the publishing process delivers once, at once. ``str`` payloads arrive as
    ``str``, ``bytes`` as ``bytes``, byte for byte.

    Pub/sub is at-most-once: a broadcast made while another process's reader
    is reconnecting does not reach that process (the reader logs the outage).
    A broadcast that Redis refuses raises :class:`BackplaneUnavailable` and
    is delivered nowhere, not even here.

    Args:
        url: as for :class:`~gstream.backplane.redis.RedisBackplane`.
        prefix: channel prefix.
        client: a ``redis.Redis`` to publish with (shared pool); by default one
            is made (``max_connections`` connections at most).
        backoff, backoff_cap: reader reconnect delays (exponential, capped, jittered).
        block: seconds one wait for messages lasts before it is re-issued.
    """

    def __init__(self, url: str = DEFAULT_URL, *, prefix: str = "gstream", client: Any = None,
                 max_connections: int = 8, connect_timeout: float = 2.0,
                 socket_timeout: float = 5.0, backoff: float = 0.05, backoff_cap: float = 5.0,
                 block: float = 5.0, **redis_kwargs: Any) -> None:
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
        self._sinks: dict[str, list[Callable[[str | bytes], None]]] = {}
        self._reader: Any = None
        self._gen = 0
        self._pid = os.getpid()
        self._closed = False
        self._pub_state = StateLog(log, f"redis hub backplane publish {redact(url)}")
        self._counts = dict.fromkeys(("broadcast", "broadcast_failed", "received",
                                      "echoes", "undecodable"), 0)

    def _channel(self, channel: str) -> str:
        return f"{self.prefix}:hub:{channel}"

    def _check(self) -> None:
        if self._closed:
            raise BackplaneUnavailable("the Redis hub backplane is closed")
        if os.getpid() != self._pid:  # forked: the reader belongs to the parent
            self._pid = os.getpid()
            self._node = os.urandom(8)
            self._reader = None
            if self._sinks:
                self._start_reader()

    def _start_reader(self) -> None:
        if self._reader is None and not self._closed:
            self._gen += 1
            self._reader = gevent.spawn(self._run, self._gen)

    def _poke(self) -> None:
        try:
            self._pub.publish(self._wake, b"")
        except TRANSIENT:
            pass  # the reader is reconnecting and subscribes to everything anyway

    def attach(self, channel: str, deliver: Callable[[str | bytes], None]) -> None:
        """Route ``channel``'s broadcasts (from every process) to ``deliver``."""
        self._check()
        first = channel not in self._sinks
        self._sinks.setdefault(channel, []).append(deliver)
        if first:
            self._start_reader()
            self._poke()

    def detach(self, channel: str, deliver: Callable[[str | bytes], None]) -> None:
        """Stop routing ``channel`` to ``deliver``; idempotent."""
        sinks = self._sinks.get(channel)
        if sinks and deliver in sinks:
            sinks.remove(deliver)
            if not sinks:
                del self._sinks[channel]

    def broadcast(self, channel: str, payload: str | bytes) -> int:
        """Send ``payload`` to ``channel`` in every process; return local sinks called.

        Raises:
            BackplaneUnavailable: Redis refused or is unreachable; nothing was
                delivered, here or elsewhere.
        """
        self._check()
        if isinstance(payload, str):
            body = b"t" + payload.encode("utf-8", "surrogatepass")
        else:
            body = b"b" + bytes(payload)
        try:
            self._pub.publish(self._channel(channel), _MAGIC + self._node + body)
        except TRANSIENT as exc:
            self._counts["broadcast_failed"] += 1
            self._pub_state.failed(exc)
            raise BackplaneUnavailable(
                f"Redis did not accept the broadcast on {channel!r}: {exc}") from exc
        self._pub_state.ok()
        self._counts["broadcast"] += 1
        return self._deliver(channel, payload)

    def _deliver(self, channel: str, payload: str | bytes) -> int:
        sinks = tuple(self._sinks.get(channel, ()))
        for deliver in sinks:
            try:
                deliver(payload)
            except Exception:  # one broken sink must not starve the others
                log.exception("redis hub backplane: delivery to %r failed", channel)
        return len(sinks)

    def close(self) -> None:
        """Stop the reader and close connections (not a shared client's); idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sinks.clear()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not gevent.getcurrent():
            reader.kill(block=True, timeout=2)
        if self._own_client:
            try:
                self._pub.connection_pool.disconnect()
            except Exception:
                log.debug("redis hub backplane: error while disconnecting", exc_info=True)

    def stats(self) -> dict[str, Any]:
        """Counters: broadcast, broadcast_failed, received, echoes, undecodable."""
        return dict(self._counts, channels=sorted(self._sinks), closed=self._closed)

    # -- the reader -------------------------------------------------------------

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
                    if pubsub is None:
                        pubsub = client.pubsub(ignore_subscribe_messages=True)
                        pubsub.subscribe(self._wake)
                        subscribed = set()
                    wanted = {self._channel(c) for c in self._sinks}
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
                    if pubsub is not None:
                        try:
                            pubsub.close()
                        except Exception:
                            pass
                        pubsub = None
                    gevent.sleep(backoff.next())
                    continue
                state.ok()
                backoff.reset()
                if (message is not None and message.get("type") == "message"
                        and gen == self._gen):  # a stale pre-fork reader must not deliver
                    self._receive(message["channel"], message["data"])
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:
                    pass
            client.connection_pool.disconnect()

    def _receive(self, raw_channel: Any, data: Any) -> None:
        chan = raw_channel.decode("utf-8", "replace") if isinstance(raw_channel, bytes) \
            else str(raw_channel)
        head = f"{self.prefix}:hub:"
        if not chan.startswith(head) or not isinstance(data, bytes):
            return
        if len(data) < _HEAD or not data.startswith(_MAGIC) or data[10:11] not in (b"t", b"b"):
            self._counts["undecodable"] += 1
            return
        if data[2:10] == self._node:
            self._counts["echoes"] += 1  # delivered here already, by broadcast()
            return
        self._counts["received"] += 1
        body = data[_HEAD:]
        payload: str | bytes = body
        if data[10:11] == b"t":
            try:
                payload = body.decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                self._counts["undecodable"] += 1
                return
        self._deliver(chan[len(head):], payload)
