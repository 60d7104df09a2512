"""Presence shared by every process of an application, in Redis (the ``gstream[redis]`` extra).

Each process holds a *lease* (a score in a sorted set, refreshed by a timer);
its connections are recorded under its node id. A process that dies stops
refreshing; the survivors reap its connections once the lease has expired,
emitting the leave events. Joins and leaves never wait for Redis: one writer
greenlet sends them. Design and bounds: docs/presence.md.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event as GEvent

from ..errors import BackplaneUnavailable, PresenceRefused
from ..presence import (
    EventDispatcher,
    PresenceChange,
    PresenceConfig,
    PresenceEvent,
    PresenceMember,
    PresenceSnapshot,
    Watcher,
    check_join,
    check_topic,
)
from ._redisutil import (
    DEFAULT_URL,
    TRANSIENT,
    Backoff,
    StateLog,
    close_pubsub,
    disconnect_client,
    make_client,
    redact,
    require_cooperative_sockets,
)

__all__ = ["RedisPresence"]

log = logging.getLogger("gstream.backplane.redis")

_BATCH = 512  # joins/leaves per pipeline
_REAP_BATCH = 500  # connections of a dead process reaped per script call
_REAP_SECONDS = 1.0  # reaping work per lease tick at most (then the next tick goes on)
_REAP_CALLS = 1000  # script calls per lease tick at most

# Shared by the scripts. Keys (all under one hash tag, so one slot):
#   B:nodes          sorted set: node id -> lease expiry (ms, Redis clock)
#   B:node:<node>    hash: "<conn> <topic>" -> member (that process's connections)
#   B:m:<topic>      hash: member -> connections (all processes)
#   B:meta:<topic>   hash: member -> meta (compact JSON)
#   B:v              the version counter (every join and leave increments it)
# Events are PUBLISHed as JSON [kind, topic, member, meta, count, version].
_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function leave_member(b, ch, topic, member)
  local mk = b .. ':m:' .. topic
  local n = redis.call('HINCRBY', mk, member, -1)
  if n > 0 then return 1 end
  redis.call('HDEL', mk, member)
  local metak = b .. ':meta:' .. topic
  local meta = redis.call('HGET', metak, member) or ''
  redis.call('HDEL', metak, member)
  local v = redis.call('INCR', b .. ':v')
  redis.call('PUBLISH', ch, cjson.encode({'leave', topic, member, meta,
                                          redis.call('HLEN', mk), v}))
  return 2
end
"""

_JOIN = _PRELUDE + """
local b, ch, node, conn, topic, member, meta = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local nk = b .. ':node:' .. node
local f = conn .. ' ' .. topic
if redis.call('HSETNX', nk, f, member) == 0 then return 0 end
local mk = b .. ':m:' .. topic
local n = tonumber(redis.call('HGET', mk, member) or '0')
if n <= 0 and redis.call('HLEN', mk) >= tonumber(ARGV[8]) then
  redis.call('HDEL', nk, f)
  return -1
end
if n >= tonumber(ARGV[9]) then
  redis.call('HDEL', nk, f)
  return -2
end
redis.call('HINCRBY', mk, member, 1)
local metak = b .. ':meta:' .. topic
local kind = nil
if n <= 0 then
  kind = 'join'
  if meta ~= '' then redis.call('HSET', metak, member, meta) end
elseif meta ~= '' and redis.call('HGET', metak, member) ~= meta then
  kind = 'update'
  redis.call('HSET', metak, member, meta)
end
if kind then
  local v = redis.call('INCR', b .. ':v')
  meta = redis.call('HGET', metak, member) or ''
  redis.call('PUBLISH', ch, cjson.encode({kind, topic, member, meta, redis.call('HLEN', mk), v}))
end
return 1
"""

_LEAVE = _PRELUDE + """
local b, ch, node, conn, topic = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local nk = b .. ':node:' .. node
local f = conn .. ' ' .. topic
local member = redis.call('HGET', nk, f)
if not member then return 0 end
redis.call('HDEL', nk, f)
return leave_member(b, ch, topic, member)
"""

# Returns 1 if the node's lease was live, 0 if it is new or had lapsed (the
# caller then writes all its connections again: survivors may have reaped them).
_REFRESH = _PRELUDE + """
local b, node, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
local old = redis.call('ZSCORE', b .. ':nodes', node)
redis.call('ZADD', b .. ':nodes', now + lease, node)
if old and tonumber(old) >= now then return 1 end
return 0
"""

# Reaps up to ARGV[3] connections of one node: ARGV[4] if given (a closing
# process wiping itself), else one whose lease expired. Returns how many
# connections it removed plus one, or 0 when there was nothing to do.
_REAP = _PRELUDE + """
local b, ch, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local node = ARGV[4]
if not node or node == '' then
  local dead = redis.call('ZRANGEBYSCORE', b .. ':nodes', '-inf', now_ms(), 'LIMIT', 0, 1)
  if #dead == 0 then return 0 end
  node = dead[1]
end
local nk = b .. ':node:' .. node
local fields = redis.call('HRANDFIELD', nk, limit, 'WITHVALUES')
for i = 1, #fields, 2 do
  local f, member = fields[i], fields[i + 1]
  local sp = string.find(f, ' ', 1, true)
  redis.call('HDEL', nk, f)
  if sp then leave_member(b, ch, string.sub(f, sp + 1), member) end
end
if redis.call('EXISTS', nk) == 0 then redis.call('ZREM', b .. ':nodes', node) end
return #fields / 2 + 1
"""


class RedisPresence:
    """:class:`~gstream.presence.Presence` across processes, in one Redis.

    Joins and leaves change this process's view at once and are written by
    one writer greenlet (pipelined, retried after an outage: the local
    connections are the truth and are written again). Events reach every
    process's watchers through one pub/sub channel, in Redis's order.
    :meth:`members` and :meth:`count` read Redis (waiting at most
    ``socket_timeout``).

    A process that dies without :meth:`close` keeps its members listed until
    its lease expires and a surviving process reaps them: at most
    ``lease * 1.25`` seconds (plus a round trip) after its last refresh.

    Args:
        url: ``redis://``, ``rediss://`` or ``redis+sentinel://`` URL.
        prefix: key and channel prefix (share it between the processes of one app).
        config: the bounds (:class:`~gstream.presence.PresenceConfig`);
            ``max_members`` and ``max_connections`` hold across processes.
        lease: seconds a process stays listed without refreshing (refreshed
            every ``lease / 4``).
        socket_timeout, connect_timeout: bounds of one Redis command.
        overrides: :class:`PresenceConfig` fields.
    """

    def __init__(self, url: str = DEFAULT_URL, *, prefix: str = "gstream",
                 config: PresenceConfig | None = None, lease: float = 10.0,
                 socket_timeout: float = 2.0, connect_timeout: float = 2.0,
                 backoff: float = 0.05, backoff_cap: float = 2.0, **overrides: Any) -> None:
        require_cooperative_sockets("the Redis presence")
        base = config if config is not None else PresenceConfig()
        self.config = PresenceConfig(**{**base.__dict__, **overrides})
        self.url = url
        self.prefix = prefix
        self.lease = max(0.2, float(lease))
        self.node = secrets.token_hex(8)
        """This process's id in Redis."""
        self._base = "{" + prefix + ":presence}"
        self._channel = f"{prefix}:presence:events"
        self._socket_timeout = socket_timeout
        self._backoff = (backoff, backoff_cap)
        self._client_args: dict[str, Any] = dict(connect_timeout=connect_timeout)
        self._client = make_client(url, max_connections=4, socket_timeout=socket_timeout,
                                   connect_timeout=connect_timeout)
        self._scripts = {name: self._client.register_script(src) for name, src in
                         (("join", _JOIN), ("leave", _LEAVE), ("refresh", _REFRESH),
                          ("reap", _REAP))}
        # conn -> (topic, member, meta JSON or ""): this process's connections.
        self._conns: dict[str, tuple[str, str, str]] = {}
        # conn -> (topic, member, meta) to write, or (topic, None, "") to remove.
        self._dirty: dict[str, tuple[str, str | None, str]] = {}
        self._rewrite = False  # write every local connection again (lease lapsed)
        self._wipe = False  # too many leaves waited for Redis: wipe this node, rewrite all
        self._seq = 0
        self._closed = False
        self._events = EventDispatcher(self.config.event_queue)
        self._work = GEvent()
        self._subscribed = GEvent()
        self._health = StateLog(log, f"redis presence {redact(url)}")
        self.counts = dict.fromkeys(("written", "refused", "reaped", "rewrites", "received",
                                     "undecodable", "failures"), 0)
        self._writer = gevent.spawn(self._write_loop)
        self._reader = gevent.spawn(self._read_loop)

    # -- the Presence protocol ----------------------------------------------

    def join(self, topic: str, member: str, meta: Any = None) -> str:
        """See :meth:`gstream.presence.Presence.join` (never waits for Redis).

        The cross-process bounds are checked in Redis: a join past them is
        not listed (counted ``refused``, logged).
        """
        if self._closed:
            raise PresenceRefused("closed")
        check_topic(topic)
        text = check_join(self.config, member, meta) or ""
        if len(self._conns) >= self.config.max_local:
            raise PresenceRefused("local", f"{self.config.max_local} connections")
        self._seq += 1
        conn = f"{self._seq:x}"
        self._conns[conn] = (topic, member, text)
        self._dirty[conn] = (topic, member, text)
        self._work.set()
        return conn

    def leave(self, conn: str) -> None:
        """See :meth:`gstream.presence.Presence.leave` (never waits for Redis)."""
        found = self._conns.pop(conn, None)
        if found is None:
            return
        # Always sent, even when the join is still queued (cheaper to undo
        # than to know whether an earlier write or a rewrite already sent it).
        self._dirty.pop(conn, None)
        if len(self._dirty) >= 2 * self.config.max_local:
            # Redis has been away through a storm of leaves: stop remembering
            # each one; wipe this process's entries and write the live ones.
            self._wipe = True
            self._dirty.clear()
        elif not self._wipe:
            self._dirty[conn] = (found[0], None, "")
        self._work.set()

    def members(self, topic: str) -> PresenceSnapshot:
        """See :meth:`gstream.presence.Presence.members` (one Redis round trip)."""
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hgetall(f"{self._base}:m:{topic}")
            pipe.hgetall(f"{self._base}:meta:{topic}")
            pipe.get(f"{self._base}:v")
            conns, metas, version = pipe.execute()
        except TRANSIENT as exc:
            raise BackplaneUnavailable(f"presence of {topic!r} unreadable: {exc}") from None
        out: dict[str, PresenceMember] = {}
        for raw, n in conns.items():
            member = raw.decode("utf-8", "replace")
            meta = metas.get(raw)
            out[member] = PresenceMember(member, int(n), _decode_meta(meta))
        return PresenceSnapshot(topic, out, int(version or 0))

    def count(self, topic: str) -> int:
        """See :meth:`gstream.presence.Presence.count` (one Redis round trip)."""
        try:
            return int(self._client.hlen(f"{self._base}:m:{topic}"))
        except TRANSIENT as exc:
            raise BackplaneUnavailable(f"presence of {topic!r} unreadable: {exc}") from None

    def watch(self, topic: str | None, callback: Watcher) -> Callable[[], None]:
        """See :meth:`gstream.presence.Presence.watch` (events of every process)."""
        return self._events.watch(topic, callback)

    def on_resync(self, callback: Callable[[], None]) -> Callable[[], None]:
        """See :meth:`gstream.presence.Presence.on_resync`: called after the event
        reader subscribed again (events of the outage were missed)."""
        return self._events.on_resync(callback)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the event reader is subscribed (every later event reaches the
        watchers); return whether it is."""
        return bool(self._subscribed.wait(timeout))

    @property
    def connections(self) -> int:
        """Connections this process holds now."""
        return len(self._conns)

    def stats(self) -> dict[str, Any]:
        """Counters: written, refused, reaped, rewrites, received, failures, pending."""
        return {**self.counts, "connections": len(self._conns), "pending": len(self._dirty),
                "events_dropped": self._events.dropped,
                "watcher_failures": self._events.failed, "node": self.node}

    def close(self, timeout: float = 2.0) -> None:
        """Leave every connection of this process (in Redis too, within ``timeout``
        seconds) and stop; idempotent. Survivors get the leave events."""
        if self._closed:
            return
        self._closed = True
        self._conns.clear()
        self._dirty.clear()
        self._work.set()
        writer, reader = self._writer, self._reader
        if writer is not gevent.getcurrent():
            writer.kill(block=True, timeout=1)
        deadline = time.monotonic() + timeout
        try:
            for _ in range(1000):
                if time.monotonic() > deadline or not self._reap(self.node):
                    break
            self._client.zrem(f"{self._base}:nodes", self.node)
        except TRANSIENT as exc:
            log.warning("redis presence: could not remove this process's members (%s); "
                        "they leave when its lease expires", exc)
        if reader is not gevent.getcurrent():
            reader.kill(block=True, timeout=1)
        self._events.clear()
        try:
            disconnect_client(self._client)
        except Exception:
            log.debug("redis presence: error while disconnecting", exc_info=True)

    # -- the writer -----------------------------------------------------------

    def _reap(self, node: str = "") -> int:
        return int(self._scripts["reap"](args=[self._base, self._channel, _REAP_BATCH, node]))

    def _tick(self) -> None:
        """Refresh the lease and reap dead processes (one lease period's work)."""
        live = self._scripts["refresh"](args=[self._base, self.node, int(self.lease * 1000)])
        if not int(live) and self._conns:
            self._rewrite = True
        until = time.monotonic() + _REAP_SECONDS
        for _ in range(_REAP_CALLS):
            done = self._reap()
            if not done:
                break
            self.counts["reaped"] += done - 1
            if time.monotonic() > until:
                break

    def _write_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        period = self.lease / 4
        next_tick = 0.0
        while not self._closed:
            try:
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + period
                if self._wipe:
                    self._reap(self.node)  # one batch per round: the loop comes back
                    if not self._client.exists(f"{self._base}:node:{self.node}"):
                        self._wipe = False
                        self._rewrite = True
                    continue
                if self._rewrite:
                    self._rewrite = False
                    self.counts["rewrites"] += 1
                    for conn, entry in self._conns.items():
                        self._dirty.setdefault(conn, entry)
                if self._dirty:
                    self._flush()
                    if self._health.ok():
                        self._rewrite = True  # back after an outage: make sure
                    backoff.reset()
                    continue
                self._health.ok()
                backoff.reset()
            except TRANSIENT as exc:
                if self._closed:
                    return
                self.counts["failures"] += 1
                self._health.failed(exc)
                gevent.sleep(backoff.next())
                continue
            except Exception:  # a bug must not end the writer (and the lease) silently
                self.counts["failures"] += 1
                log.exception("redis presence writer failed; retrying")
                gevent.sleep(backoff.next())
                continue
            self._work.clear()
            if not self._dirty and not self._wipe and not self._closed:
                self._work.wait(max(0.0, next_tick - time.monotonic()))

    def _flush(self) -> None:
        batch: list[tuple[str, tuple[str, str | None, str]]] = []
        for conn in list(self._dirty)[:_BATCH]:
            batch.append((conn, self._dirty.pop(conn)))
        try:
            pipe = self._client.pipeline(transaction=False)
            cfg = self.config
            for conn, (topic, member, meta) in batch:
                if member is None:
                    self._scripts["leave"](args=[self._base, self._channel, self.node, conn,
                                                 topic], client=pipe)
                else:
                    self._scripts["join"](args=[self._base, self._channel, self.node, conn,
                                                topic, member, meta, cfg.max_members,
                                                cfg.max_connections], client=pipe)
            replies = pipe.execute()
        except TRANSIENT:
            for conn, entry in batch:  # newer changes of the same connection win
                if entry[1] is None or conn in self._conns:
                    self._dirty.setdefault(conn, entry)
            raise
        except Exception:
            # Not Redis being away: retrying the same batch would fail forever
            # and stop every later write. Drop it, loudly.
            self.counts["failures"] += 1
            log.exception("redis presence: %d changes dropped", len(batch))
            return
        self.counts["written"] += len(batch)
        for (_conn, (topic, member, _meta)), reply in zip(batch, replies, strict=True):
            if member is not None and int(reply) < 0:
                self.counts["refused"] += 1
                log.info("redis presence: %r not listed in %r: %s", member, topic,
                         "topic full" if int(reply) == -1 else "too many connections")

    # -- the reader -------------------------------------------------------------

    def _read_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        state = StateLog(log, f"redis presence reader {redact(self.url)}")
        client = make_client(self.url, max_connections=1,
                             socket_timeout=5.0 + self._socket_timeout, **self._client_args)
        pubsub: Any = None
        try:
            while not self._closed:
                try:
                    if pubsub is None:
                        pubsub = client.pubsub()
                        pubsub.subscribe(self._channel)
                    message = pubsub.get_message(timeout=5.0)
                except TRANSIENT as exc:
                    if self._closed:
                        return
                    state.failed(exc)
                    close_pubsub(pubsub)
                    pubsub = None
                    gevent.sleep(backoff.next())
                    continue
                state.ok()
                backoff.reset()
                kind = message.get("type") if message is not None else None
                if kind == "message":
                    self._receive(message["data"])
                elif kind == "subscribe":  # Redis confirmed: every later event reaches us
                    if self._subscribed.is_set():
                        # Subscribed again after an outage: events were missed, so
                        # the watchers that keep lists re-read them.
                        self._events.resync()
                    self._subscribed.set()
        finally:
            close_pubsub(pubsub)
            disconnect_client(client)

    def _receive(self, data: Any) -> None:
        if self._events.idle:
            return  # nobody here watches: don't even decode
        try:
            kind, topic, member, meta, count, version = json.loads(data)
            event = PresenceEvent(PresenceChange(kind), str(topic), str(member),
                                  _decode_meta(meta), int(count), int(version))
        except (ValueError, TypeError):
            self.counts["undecodable"] += 1
            return
        self.counts["received"] += 1
        self._events.emit(event)


def _decode_meta(raw: Any) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
