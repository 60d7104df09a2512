"""Publish to gstream's Redis backplane from processes that are not servers.

:class:`Publisher` writes the same stream entries and hub envelopes as
:class:`~gstream.backplane.redis.RedisBackplane`, synchronously, with plain
redis-py: for a cron script, a Celery task or an RQ job (docs/publishers.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import BackplaneUnavailable
from ..events import Event
from ._redisutil import (
    DEFAULT_URL,
    TRANSIENT,
    disconnect_client,
    entry_fields,
    hub_channel,
    hub_envelope,
    is_cluster_url,
    make_client,
    sentinel_url,
    stream_key,
)

__all__ = ["Publisher"]


class Publisher:
    """Publish SSE events and hub broadcasts to the servers sharing a Redis.

    Thread-safe (redis-py's pool); one per process is enough. Each call is
    one round trip; :meth:`publish_many` sends a list in one pipeline.

    Args:
        url: the servers' Redis URL (``redis://``, ``rediss://``, ``unix://``,
            ``redis+sentinel://``, ``redis+cluster://``).
        prefix: the servers' backplane prefix.
        maxlen: approximate entries kept per topic stream (use the servers' value).
        max_connections: size of the connection pool.
        connect_timeout, socket_timeout: seconds.
        sentinels, service: Redis Sentinel without a URL: the sentinels'
            ``(host, port)`` pairs and the monitored service's name.
        redis_kwargs: passed to redis-py's connection pool.
    """

    def __init__(self, url: str = DEFAULT_URL, *, prefix: str = "gstream",
                 maxlen: int = 10_000, max_connections: int = 4, connect_timeout: float = 2.0,
                 socket_timeout: float = 5.0, sentinels: Sequence[tuple[str, int]] | None = None,
                 service: str | None = None, **redis_kwargs: Any) -> None:
        url = sentinel_url(url, sentinels, service)
        self.prefix = prefix
        self.maxlen = max(1, int(maxlen))
        self._client = make_client(url, max_connections=max_connections,
                                   connect_timeout=connect_timeout,
                                   socket_timeout=socket_timeout, **redis_kwargs)
        self._cluster = is_cluster_url(url)
        self._origin = os.urandom(8)  # never equal to a server link's: delivered to every hub

    def _xadd(self, topic: str, event: Event) -> tuple[Any, ...]:
        return ("XADD", stream_key(self.prefix, topic, self._cluster), "MAXLEN", "~", self.maxlen, "*",
                *entry_fields(event))

    def publish(self, topic: str, data: str | Event, *, event: str | None = None,
                retry: int | None = None) -> str:
        """Append one event to ``topic``; every server's subscribers get it. Returns its id.

        ``data`` is the event's data (or a whole :class:`~gstream.events.Event`,
        whose id is ignored: Redis numbers it); ``event`` its ``event:`` name
        (None: a plain message); ``retry`` a reconnection hint in ms.

        Raises:
            BackplaneUnavailable: Redis is unreachable or refused it (not published).
        """
        return self.publish_many(topic, [_event(data, event, retry)])[0]

    def publish_many(self, topic: str, events: Iterable[str | Event]) -> list[str]:
        """Append ``events`` to ``topic`` in order, in one pipeline; return their ids.

        Raises:
            BackplaneUnavailable: Redis is unreachable or refused them. A
                failed round trip publishes none of them; an error reply
                (e.g. Redis out of memory) names how many were appended.
        """
        batch = [_event(e, None, None) for e in events]
        if not batch:
            return []
        try:
            pipe = self._client.pipeline(transaction=False)
            for e in batch:
                pipe.execute_command(*self._xadd(topic, e))
            replies = pipe.execute(raise_on_error=False)
        except TRANSIENT as exc:
            raise BackplaneUnavailable(
                f"Redis did not accept the events for topic {topic!r}: {exc}") from exc
        ids: list[str] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise BackplaneUnavailable(
                    f"Redis refused an event for topic {topic!r} ({len(ids)} of "
                    f"{len(batch)} appended): {reply}")
            ids.append(reply.decode() if isinstance(reply, bytes) else str(reply))
        return ids

    def broadcast(self, channel: str, payload: str | bytes) -> int:
        """Send ``payload`` to the members of hub ``channel`` in every server.

        ``str`` arrives as a text frame, ``bytes`` as a binary one. At most
        once: a server whose pub/sub connection is reconnecting misses it.
        Returns how many server links received it (Redis's ``PUBLISH`` reply).

        Raises:
            BackplaneUnavailable: Redis is unreachable or refused it.
        """
        try:
            return int(self._client.execute_command(
                "PUBLISH", hub_channel(self.prefix, channel), hub_envelope(self._origin, payload)))
        except TRANSIENT as exc:
            raise BackplaneUnavailable(
                f"Redis did not accept the broadcast on {channel!r}: {exc}") from exc

    def close(self) -> None:
        """Close the connections; idempotent."""
        disconnect_client(self._client)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _event(data: str | Event, name: str | None, retry: int | None) -> Event:
    if isinstance(data, Event):
        return data
    return Event(data=data, name=name or "", retry=retry)  # a name makes it a custom event
