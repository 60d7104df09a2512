"""Shared plumbing of the Redis backplanes: clients, backoff, state logging, the outbox."""

from __future__ import annotations

import logging
import random
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import gevent
from gevent.event import Event as GEvent

from ..errors import BackplaneUnavailable
from ..events import Event, EventType

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Redis backplane needs the 'redis' package: pip install 'gstream[redis]'"
    ) from exc

__all__ = ["redis", "TRANSIENT", "Backoff", "StateLog", "make_client", "redact", "parse_id",
           "DEFAULT_URL", "Outbox", "Pending", "entry_fields", "stream_key", "hub_channel",
           "hub_envelope", "require_cooperative_sockets", "is_cluster_url", "disconnect_client",
           "sentinel_url", "close_pubsub"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: Errors after which a retry may succeed (Redis down, restarting, loading,
#: failing over, refusing our password for now). Everything redis-py raises.
TRANSIENT: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

_STREAM_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def parse_id(value: str | bytes | None) -> tuple[int, int] | None:
    """Parse a Redis stream id ``<ms>-<seq>``; None if it is not one."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    m = _STREAM_ID.match(value)
    return (int(m.group(1)), int(m.group(2))) if m else None


def redact(url: str) -> str:
    """``url`` without its credentials and query, for logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid redis url>"
    hosts = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{hosts}{parts.path}"


SENTINEL_SCHEME = "redis+sentinel"


def parse_sentinel_url(url: str) -> dict[str, Any]:
    """Split ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``.

    Returns ``sentinels`` (list of (host, port)), ``service``, ``db``,
    ``username`` and ``password`` (those of the Redis servers; the sentinels
    themselves are asked without credentials unless ``sentinel_password`` is
    passed as a keyword).

    Raises:
        ValueError: not such a URL, or no service name.
    """
    spec = _split_hosts(url, SENTINEL_SCHEME, 26379)
    path = spec["path"]
    if not path:
        raise ValueError(f"{SENTINEL_SCHEME} URL needs host:port[,host:port]/service[/db]: "
                         f"{redact(url)}")
    return {"sentinels": spec["hosts"], "service": path[0],
            "db": int(path[1]) if len(path) > 1 else 0,
            "username": spec["username"], "password": spec["password"]}


def sentinel_url(url: str, sentinels: Sequence[tuple[str, int]] | None,
                 service: str | None) -> str:
    """``url``, or the ``redis+sentinel://`` URL of ``sentinels`` + ``service``.

    With ``sentinels`` (a list of (host, port)), the credentials and db of
    ``url`` (a ``redis://`` URL; its host is ignored) are those of the Redis
    servers behind the sentinels.

    Raises:
        ValueError: ``sentinels`` without ``service`` (or the reverse), an
            empty list, or a host/port that is not one.
    """
    if sentinels is None:
        if service is not None:
            raise ValueError("service= names a Sentinel service: pass sentinels= too")
        return url
    if not service:
        raise ValueError("sentinels= needs service= (the name the sentinels monitor)")
    hosts: list[str] = []
    for item in sentinels:
        try:
            host, port = item
            port = int(port)
        except (TypeError, ValueError):
            raise ValueError(f"sentinels= wants (host, port) pairs, got {item!r}") from None
        if not isinstance(host, str) or not host or not 0 < port < 65536:
            raise ValueError(f"not a sentinel address: {item!r}")
        hosts.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if not hosts:
        raise ValueError("sentinels= is empty")
    parts = urlsplit(url)
    creds = parts.netloc.rpartition("@")[0]
    db = [p for p in parts.path.split("/") if p][:1]
    path = "/".join([quote(service, safe="")] + db)
    return f"{SENTINEL_SCHEME}://{creds + '@' if creds else ''}{','.join(hosts)}/{path}"


def _split_hosts(url: str, scheme: str, default_port: int) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ValueError(f"not a {scheme}:// URL: {redact(url)}")
    creds, _, hosts = parts.netloc.rpartition("@")
    user, _, password = creds.partition(":") if creds else ("", "", "")
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if host:
            found.append((host.strip("[]"), int(port) if port else default_port))
    if not found:
        raise ValueError(f"{scheme} URL needs host:port[,host:port...]: {redact(url)}")
    return {"hosts": found, "path": [unquote(p) for p in parts.path.split("/") if p],
            "username": unquote(user) or None, "password": unquote(password) or None}


def make_client(url: str, *, max_connections: int, connect_timeout: float,
                socket_timeout: float | None, **kwargs: Any) -> Any:
    """A ``redis.Redis`` over a bounded blocking pool, with redis-py's own retries off.

    Retries are ours to decide: a silently retried ``XADD`` could append an
    event twice, and the reader has its own backoff loop. A pooled
    connection that died with a Redis restart is detected and replaced by
    the pool when it is checked out (redis-py checks it before use).
    """
    kwargs.setdefault("health_check_interval", 30)
    if url.startswith(SENTINEL_SCHEME + "://"):
        # Redis Sentinel: every new connection asks the sentinels for the
        # current master; one to a demoted master fails (ConnectionError),
        # so the callers' reconnect paths follow a failover by themselves.
        from redis.sentinel import Sentinel

        spec = parse_sentinel_url(url)
        sentinel_password = kwargs.pop("sentinel_password", None)
        sentinel = Sentinel(spec["sentinels"], socket_timeout=connect_timeout,
                            socket_connect_timeout=connect_timeout,
                            sentinel_kwargs={"password": sentinel_password,
                                             "socket_timeout": connect_timeout,
                                             "socket_connect_timeout": connect_timeout})
        return sentinel.master_for(
            spec["service"], db=spec["db"], username=spec["username"],
            password=spec["password"], max_connections=max(1, max_connections),
            socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0), **kwargs)
    if is_cluster_url(url):
        # Redis Cluster: redis-py follows MOVED/ASK and slot changes itself.
        from redis.cluster import ClusterNode, RedisCluster

        spec = _split_hosts(url, CLUSTER_SCHEME, 6379)
        kwargs.pop("health_check_interval", None)
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in spec["hosts"]],
            username=spec["username"], password=spec["password"],
            # No pool bound: on a cluster every topic's reader holds a connection.
            socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0), **kwargs)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max(1, max_connections), timeout=connect_timeout,
        socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0), **kwargs)
    return redis.Redis(connection_pool=pool)


class Backoff:
    """Exponential backoff, capped, with jitter (so restarting fleets do not stampede)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = max(0.001, base)
        self.cap = max(self.base, cap)
        self.attempt = 0

    def next(self) -> float:
        """The next delay in seconds (between half and all of the exponential step)."""
        step = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        """Back to the shortest delay (after a success)."""
        self.attempt = 0


class StateLog:
    """Logs connection state *changes* only: one line when lost, one when back."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.up: bool | None = None
        self.since = time.monotonic()
        self.failures = 0

    def ok(self, detail: Callable[[], str] | None = None) -> bool:
        """Record a success; True if this is a recovery (was down).

        ``detail()`` is appended to the recovery line (computed only then).
        """
        recovered = self.up is False
        if recovered:
            self.log.warning("%s: Redis reachable again after %.1fs (%d failed attempts)%s",
                             self.what, time.monotonic() - self.since, self.failures,
                             detail() if detail is not None else "")
        elif self.up is None:
            self.log.info("%s: connected", self.what)
        if self.up is not True:
            self.up, self.since, self.failures = True, time.monotonic(), 0
        return recovered

    def failed(self, exc: BaseException) -> None:
        """Record a failure; logs only the first one of an outage."""
        self.failures += 1
        if self.up is not False:
            self.log.warning("%s: Redis unavailable (%s: %s); retrying with backoff",
                             self.what, type(exc).__name__, exc)
            self.up, self.since = False, time.monotonic()
        else:
            self.log.debug("%s: still unavailable (%s)", self.what, exc)


def stream_key(prefix: str, topic: str, cluster: bool = False) -> str:
    """The Redis stream of a broker topic (shared by every writer and reader).

    On a Redis Cluster the topic is a hash tag (``<prefix>:sse:{<topic>}``):
    each topic lives on one slot, different topics spread over the nodes.
    """
    return f"{prefix}:sse:{{{topic}}}" if cluster else f"{prefix}:sse:{topic}"


CLUSTER_SCHEME = "redis+cluster"


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://host:port[,host:port...]`` URLs."""
    return url.startswith(CLUSTER_SCHEME + "://")


def disconnect_client(client: Any) -> None:
    """Close every pooled connection of a ``Redis`` or ``RedisCluster`` client."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.disconnect()
        return
    for node in client.get_nodes():  # RedisCluster: one pool per node
        if node.redis_connection is not None:
            node.redis_connection.connection_pool.disconnect()


def close_pubsub(pubsub: Any) -> None:
    """Close a pub/sub connection that failed or is done with; None is fine.

    Errors are ignored: the connection is being dropped because it broke.
    """
    if pubsub is None:
        return
    try:
        pubsub.close()
    except Exception:
        pass


def hub_channel(prefix: str, channel: str) -> str:
    """The Redis pub/sub channel of a hub channel."""
    return f"{prefix}:hub:{channel}"


# Hub envelope: magic, 8-byte origin (the publishing link's id), kind (t =
# text, b = binary), payload bytes.
HUB_MAGIC = b"G1"
HUB_HEAD = len(HUB_MAGIC) + 8 + 1


def hub_envelope(origin: bytes, payload: str | bytes) -> bytes:
    """The pub/sub message carrying ``payload`` from the link ``origin`` (8 bytes)."""
    if isinstance(payload, str):
        return HUB_MAGIC + origin + b"t" + payload.encode("utf-8", "surrogatepass")
    return HUB_MAGIC + origin + b"b" + bytes(payload)


def entry_fields(event: Event) -> list[Any]:
    """The stream entry fields of ``event``, flattened for ``XADD`` (its id is not sent)."""
    fields: list[Any] = [b"d", event.data.encode("utf-8", "replace")]
    if event.type is not EventType.MESSAGE:
        fields += [b"t", int(event.type)]
    if event.type is EventType.CUSTOM and event.name:
        fields += [b"n", event.name.encode("utf-8", "replace")]
    if event.retry is not None and event.retry > 0:
        fields += [b"r", int(event.retry)]
    return fields


def require_cooperative_sockets(what: str) -> None:
    """Refuse to run a greenlet-based Redis client on blocking sockets.

    redis-py uses the ``socket`` module: unpatched, its blocking reads hold
    the whole gevent loop (every request of the server waits for them).

    Raises:
        RuntimeError: ``socket`` is not monkey-patched by gevent.
    """
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        raise RuntimeError(
            f"{what} needs gevent-patched sockets, or its Redis reads would block every "
            "greenlet of this process: call `from gevent import monkey; monkey.patch_all()` "
            "first thing in the program (`gstream serve` and gunicorn's gevent worker do it). "
            "To publish from a plain (non-gevent) process use "
            "gstream.backplane.redis.Publisher instead.")


class Pending:
    """One command in an :class:`Outbox`: its arguments, then its reply or error.

    ``accepted`` becomes True once the caller stopped waiting for the reply
    (or never waited): from then on the outbox owns the command.
    """

    __slots__ = ("args", "reply", "error", "accepted")

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.reply: Any = None
        self.error: BaseException | None = None
        self.accepted = False

    @property
    def settled(self) -> bool:
        """True once Redis answered (reply or error)."""
        return self.reply is not None or self.error is not None


class Outbox:
    """A bounded FIFO of Redis commands, sent by one writer greenlet in pipelines.

    Callers never talk to Redis themselves, so a Redis that stalls stalls
    only the writer: :meth:`put` returns at once and :meth:`wait` waits at
    most the time it is given. Each round trip sends everything queued (up
    to ``batch`` commands) in one pipeline, in queue order.

    After a failed round trip Redis is considered down for one backoff
    delay: :meth:`put` raises at once meanwhile. While a round trip has been
    unanswered for more than ``stall_limit`` seconds (Redis stalls), :meth:`put`
    raises at once too, so a stall accepts at most ``stall_limit`` seconds'
    worth of commands, all sent when Redis answers. Commands whose caller was
    still waiting fail (the caller gets :class:`BackplaneUnavailable`: not
    accepted). Accepted commands are retried first, in order, when
    ``retry_accepted`` (broker events: nothing accepted is lost), else
    dropped and counted (hub broadcasts: at-most-once).

    Args:
        client: the ``redis.Redis`` to send with.
        limit: most commands queued; past it :meth:`put` raises.
        batch: most commands per pipeline.
        state: logs the connection state changes.
        retry_accepted: retry accepted commands after a failure (else drop them).
        what: names the commands in errors ("event", "broadcast").
        stall_limit: seconds a round trip may stay unanswered before
            :meth:`put` refuses new commands (None: never).
    """

    def __init__(self, client: Any, *, limit: int, batch: int, backoff: float,
                 backoff_cap: float, state: StateLog, retry_accepted: bool, what: str,
                 stall_limit: float | None = None) -> None:
        self.client = client
        self.limit = max(1, int(limit))
        self.batch = max(1, int(batch))
        self.retry_accepted = retry_accepted
        self.what = what
        self.state = state
        self._backoff = Backoff(backoff, min(backoff_cap, 1.0))
        self._queue: deque[Pending] = deque()
        self._work = GEvent()
        self._done = GEvent()
        self._writer: Any = None
        self._down_until = 0.0
        self.stall_limit = None if stall_limit is None else max(0.0, float(stall_limit))
        self._sending_since: float | None = None  # a round trip is waiting for Redis
        self._last_error: BaseException | None = None
        self._closed = False
        self.counts = dict.fromkeys(("sent", "round_trips", "failed", "lost", "full",
                                      "stalled"), 0)

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, items: list[Pending]) -> None:
        """Queue ``items`` (all or none); the writer sends them soon.

        Raises:
            BackplaneUnavailable: closed, Redis is down (a round trip failed
                less than one backoff delay ago), stalled (a round trip has
                been unanswered for more than ``stall_limit``), or the queue
                has no room for all of ``items``.
        """
        if self._closed:
            raise BackplaneUnavailable("the Redis backplane is closed")
        now = time.monotonic()
        if now < self._down_until:
            raise BackplaneUnavailable(f"Redis did not accept the {self.what}: "
                                       f"unavailable ({self._last_error})")
        stalled = self.stalled_for(now)
        if self.stall_limit is not None and stalled > self.stall_limit:
            self.counts["stalled"] += 1
            raise BackplaneUnavailable(
                f"Redis did not accept the {self.what}: it has not answered for "
                f"{stalled:.2f}s (stalled; limit {self.stall_limit:g}s)")
        if len(self._queue) + len(items) > self.limit:
            self.counts["full"] += 1
            raise BackplaneUnavailable(
                f"Redis did not accept the {self.what}: the outbound queue is full "
                f"({len(self._queue)} waiting for Redis, limit {self.limit})")
        self._queue.extend(items)
        if self._writer is None or self._writer.dead:
            self._writer = gevent.spawn(self._run)
        self._work.set()

    @property
    def healthy(self) -> bool:
        """True while the last round trip succeeded (False before the first one)."""
        return self.state.up is True

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds the current round trip has been waiting for Redis (0: none)."""
        since = self._sending_since
        if since is None:
            return 0.0
        return (time.monotonic() if now is None else now) - since

    def wait(self, item: Pending, timeout: float) -> None:
        """Wait up to ``timeout`` s for Redis to answer ``item``; then it is accepted.

        Never raises: the caller reads ``item.reply`` / ``item.error``.
        """
        deadline = time.monotonic() + timeout
        while not item.settled:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._done.wait(remaining)
        if not item.settled:
            item.accepted = True

    def _notify(self) -> None:
        done, self._done = self._done, GEvent()
        done.set()

    def _run(self) -> None:
        queue = self._queue
        while not self._closed:
            if not queue:
                self._work.clear()
                self._work.wait()
                continue
            items = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
            pipe = self.client.pipeline(transaction=False)
            for it in items:
                pipe.execute_command(*it.args)
            self._sending_since = time.monotonic()
            try:
                replies = pipe.execute(raise_on_error=False)
            except TRANSIENT as exc:
                self._sending_since = None
                self._failed(items, exc)
                continue
            except Exception as exc:  # a bug or an unexpected client error: keep the writer alive
                self._sending_since = None
                self.state.log.exception("%s: unexpected error sending a pipeline",
                                         self.state.what)
                self._failed(items, exc)
                continue
            self._sending_since = None
            self.state.ok()
            self._backoff.reset()
            self.counts["round_trips"] += 1
            for it, reply in zip(items, replies, strict=True):
                if isinstance(reply, Exception):
                    # Refused by Redis itself (OOM, WRONGTYPE...): a retry would fail too.
                    it.error = reply
                    self.counts["failed"] += 1
                    if it.accepted:
                        self.counts["lost"] += 1
                        self.state.log.warning("%s: Redis refused an accepted %s: %s",
                                               self.state.what, self.what, reply)
                else:
                    it.reply = reply
                    self.counts["sent"] += 1
            self._notify()

    def _failed(self, items: list[Pending], exc: BaseException) -> None:
        self.state.failed(exc)
        self._last_error = exc
        keep: list[Pending] = []
        for it in items:
            if it.accepted and self.retry_accepted:
                keep.append(it)
            else:
                it.error = exc
                self.counts["failed"] += 1
                if it.accepted:
                    self.counts["lost"] += 1
        # Those still queued behind the batch: their callers are told too
        # (Redis is down), accepted ones wait for the retry.
        for it in list(self._queue):
            if not it.accepted:
                it.error = exc
                self.counts["failed"] += 1
        rest = [it for it in self._queue if it.accepted]
        self._queue.clear()
        if self.retry_accepted:
            self._queue.extend(keep + rest)
        else:
            self.counts["lost"] += len(rest)
        self._notify()
        delay = self._backoff.next()
        self._down_until = time.monotonic() + delay
        try:
            disconnect_client(self.client)
        except Exception:  # a broken pool is replaced on the next checkout
            pass
        gevent.sleep(delay)

    def close(self, timeout: float) -> int:
        """Let the writer send what is queued (at most ``timeout`` s), stop it.

        Returns the number of accepted commands that were never sent.
        """
        deadline = time.monotonic() + timeout
        while self._queue and self._writer is not None and time.monotonic() < deadline:
            gevent.sleep(0.01)
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=True, timeout=2)
        unsent = len(self._queue)
        for it in self._queue:
            it.error = BackplaneUnavailable("the Redis backplane is closed")
        self._queue.clear()
        self.counts["lost"] += unsent
        self._notify()
        return unsent

    def forked(self) -> None:
        """In a forked child: the writer and the queue belong to the parent."""
        self._writer = None
        self._sending_since = None
        self._queue.clear()
        self._work = GEvent()
        self._done = GEvent()
