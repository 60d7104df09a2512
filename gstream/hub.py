"""Hub: broadcast WebSocket messages to a set of connections (a room).

One greenlet drains a bounded channel in batches and fans them out, each
message framed once and each run of messages for everyone joined once; a
member whose send buffer is full gets the slow-member policy, so one stalled
peer costs only its own messages. Design: docs/hub.md.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, cast

import gevent
import gevent.event

from .backplane import HubBackplane
from .backplane.memory import MemoryBackplane
from .errors import BackplaneUnavailable, Closed, PresenceRefused
from .policies import SlowPolicy
from .presence import Presence, PresenceEvent, PresenceSnapshot
from .threadsafe import LoopBinding, allocate_lock
from .types import Message
from .websocket import PreparedMessage, WebSocket, prepare, prepare_run

__all__ = ["Hub", "HubConfig", "HubCounters", "HubStats", "HubBackplane", "MemoryBackplane",
           "SlowPolicy", "SLOW_POLICIES"]

log = logging.getLogger("gstream.hub")

#: The values :attr:`HubConfig.slow_policy` accepts (kept for existing callers).
SLOW_POLICIES = tuple(p.value for p in SlowPolicy)
_BATCH_MESSAGES = 64  # messages queued to members before they are flushed (one send each)
_BATCH_SECONDS = 0.05  # ...or this much fan-out work: bounds the first message's wait
# A run of messages for everyone is joined into chunks of at most this many bytes: a
# partial send copies the rest of a member's chunk, so it must stay small (docs/hub.md).
_RUN_BYTES = 64 * 1024
_YIELD_DELIVERIES = 16384  # frames (or runs) queued between two yields inside one huge fan-out
_FLUSH_YIELD = 2048  # members flushed between two yields
_THREAD_CALL_TIMEOUT = 10.0  # a native thread waits this long at most for the hub's thread

Where = Callable[..., bool]
# (message, excluded connections, where, where's arity, forward to the backplane)
_Item = tuple[Message, "frozenset[WebSocket] | None", "Where | None", int, bool]


@dataclass
class HubConfig:
    """Settings of a :class:`Hub`; invalid values raise ``ValueError``."""

    broadcast_buffer: int = 1024
    """Broadcasts waiting for the hub greenlet; :meth:`Hub.broadcast` drops (and
    counts) beyond this, :meth:`Hub.broadcast_wait` waits."""
    slow_policy: SlowPolicy | str = SlowPolicy.DROP_OLDEST
    """What a member whose send buffer is full gets: ``"drop_oldest"`` (its
    oldest queued messages make room; deflate members drop the new one
    instead), ``"drop_newest"`` (it misses the new message) or ``"close"``
    (closed with :attr:`close_code`). A :class:`~gstream.policies.SlowPolicy`
    or its value; normalised to the member."""
    close_code: int = 1013
    """Close code of the ``"close"`` policy: 1013 (try again later), 1008
    (policy violation) or an application code 4000-4999."""
    close_reason: str = "too slow"
    """Close reason sent with :attr:`close_code`."""
    max_members: int = 0
    """Members at most; :meth:`Hub.register` returns False beyond. 0 = unlimited."""
    presence: Presence | None = field(default=None, repr=False)
    """Where members are listed (:mod:`gstream.presence`): each registered
    connection joins the hub's ``name`` as its ``key`` (``anon:<random>``
    without one). None: no presence."""
    presence_events: bool = False
    """Send members the presence messages (docs/presence.md): a ``sync``
    (the member list) to each new member, a ``join``/``leave`` to all."""

    def __post_init__(self) -> None:
        if self.broadcast_buffer < 1:
            raise ValueError("broadcast_buffer must be >= 1")
        self.slow_policy = SlowPolicy.parse(self.slow_policy, "slow_policy")
        if self.close_code not in (1008, 1013) and not 4000 <= self.close_code <= 4999:
            raise ValueError("close_code must be 1008, 1013 or 4000-4999")
        if len(self.close_reason.encode("utf-8")) > 123:
            raise ValueError("close_reason longer than 123 bytes")
        self.max_members = max(0, int(self.max_members))


class HubCounters(TypedDict):
    """The counters of :meth:`Hub.stats`, since the hub was created."""

    broadcasts: int
    """Broadcasts accepted into the channel."""
    fanned_out: int
    """Messages the hub greenlet processed."""
    deliveries: int
    """Messages queued to members (one per member and message, also inside a run)."""
    drops: int
    """Broadcasts refused, channel full."""
    member_drops: int
    """Messages slow members lost."""
    closed_slow: int
    """Members closed by the ``close`` slow policy."""
    rejected: int
    """Registers refused at ``max_members``."""
    remote: int
    """Messages from the backplane."""
    discarded: int
    """Messages still in the channel at stop."""
    registered: int
    unregistered: int
    backplane_failures: int
    """Broadcasts the backplane refused (delivered locally only)."""
    presence_refused: int
    """Registers refused by the presence (a bound, docs/presence.md)."""


class HubStats(HubCounters):
    """What :meth:`Hub.stats` returns: the counters and the hub's state now."""

    name: str
    members: int
    queued: int
    """Messages in the channel now."""
    running: bool
    stopped: bool


class _Member:
    __slots__ = ("ws", "key", "drops", "shares", "batched", "presence", "deaf")

    def __init__(self, ws: WebSocket, key: Any) -> None:
        self.ws = ws
        self.key = key
        self.presence: str | None = None  # presence connection id
        self.deaf = False  # gets no presence messages
        self.drops = 0
        self.shares = ws.shares_frames  # fixed at the handshake
        self.batched = 0  # frames queued in this batch (flush due when > 0)


def _arity(fn: Callable[..., Any]) -> int:
    """1 for ``where(ws)``, 2 for ``where(ws, key)``."""
    code = getattr(fn, "__code__", None)
    if code is not None and not code.co_flags & 0x04:  # no *args
        n = code.co_argcount - (1 if getattr(fn, "__self__", None) is not None else 0)
        return 2 if n >= 2 else 1
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return 2 if len(positional) >= 2 else 1


def _excluded(exclude: Any) -> frozenset[WebSocket] | None:
    if exclude is None:
        return None
    if isinstance(exclude, WebSocket) or not isinstance(exclude, Collection):
        return frozenset((exclude,))
    return frozenset(exclude)


class Hub:
    """A set of WebSocket connections with a broadcast greenlet (one room).

    Several hubs coexist (one per room or channel) and a connection may be in
    several. All methods may be called from any greenlet; ``broadcast`` never
    blocks, and from a native OS thread it does not wait for the hub either.

    Args:
        config: a :class:`HubConfig`; keyword ``overrides`` replace its fields.
        name: the channel name (used by the backplane and in logs).
        backplane: a :class:`HubBackplane` to reach other processes; None keeps
            delivery in this process.
    """

    def __init__(self, config: HubConfig | None = None, *, name: str = "",
                 backplane: HubBackplane | None = None, **overrides: Any) -> None:
        base = config if config is not None else HubConfig()
        self.config = replace(base, **overrides) if overrides else replace(base)
        self.name = name
        self._members: dict[WebSocket, _Member] = {}
        self._snapshot: tuple[_Member, ...] | None = None
        self._hooked: weakref.WeakSet[WebSocket] = weakref.WeakSet()
        # A deque because native threads append to it directly (append and
        # popleft are atomic); the hub's thread is woken with a loop callback.
        self._channel: deque[_Item] = deque()
        self._wake = gevent.event.Event()
        self._wake_pending = False
        self._room = gevent.event.Event()
        self._thread_waiters: list[Any] = []
        self._stopped = False
        self._closing: list[WebSocket] = []
        self._runner: gevent.Greenlet | None = None
        self._started: gevent.Greenlet | None = None
        self._done = gevent.event.Event()
        self._binding = LoopBinding()
        self._stats = cast(HubCounters, dict.fromkeys(HubCounters.__annotations__, 0))
        self._backplane = backplane
        if backplane is not None:
            backplane.attach(name, self._deliver_remote)
        self._presence = self.config.presence
        self._unwatch: list[Callable[[], None]] = []
        if self._presence is not None and self.config.presence_events:
            self._unwatch = [self._presence.watch(name, self._on_presence),
                             self._presence.on_resync(self._resync)]

    # -- the hub greenlet ----------------------------------------------------

    def run(self) -> None:
        """Drain the broadcast channel and fan out; return after :meth:`stop`.

        Run it in its own greenlet (``gevent.spawn(hub.run)`` or
        :meth:`start`), in the thread that created the hub.
        """
        if not self._binding.here():
            raise RuntimeError("Hub.run() must run in the thread that created the hub")
        if self._runner is not None:
            raise RuntimeError("Hub.run() is already running")
        if self._stopped:
            return
        self._runner = gevent.getcurrent()
        self._done.clear()
        try:
            self._loop()
        finally:
            self._runner = None
            self._done.set()

    def _loop(self) -> None:
        # Batches: take messages while they keep coming (a short linger lets
        # a publisher add its next one), then fan the batch out, only
        # *queueing* frames, and flush every member once, so a burst of k
        # messages costs each member one send() instead of k. A batch closes
        # when the channel stays empty, after _BATCH_MESSAGES or after
        # _BATCH_SECONDS.
        channel = self._channel
        dirty: list[_Member] = []
        batch: list[_Item] = []
        try:
            while not self._stopped:
                if not channel:
                    self._wake.clear()
                    if channel or self._stopped:
                        continue
                    self._wake.wait()
                    continue
                started = time.perf_counter()
                while channel and not self._stopped:
                    batch.append(self._take_one())
                    if (len(batch) >= _BATCH_MESSAGES
                            or time.perf_counter() - started >= _BATCH_SECONDS):
                        break
                    if not channel:
                        gevent.sleep(0)  # linger: a publisher's next message joins this batch
                self._fan_out_batch(batch, dirty)
                self._flush(dirty)
                gevent.sleep(0)  # let members, publishers and the rest of the app run
        finally:
            # Killed or stopped mid-batch: what was taken is queued, nothing stays unsent.
            try:
                self._fan_out_batch(batch, dirty)
            finally:
                self._flush(dirty)

    def _take_one(self) -> _Item:
        item = self._channel.popleft()
        message, _, _, _, forward = item
        self._signal_room()
        if forward and self._backplane is not None:
            try:
                self._backplane.broadcast(self.name, message)
            except BackplaneUnavailable as exc:
                # An outage is expected and already logged by the backplane on
                # each state change: count it, don't dump a traceback per message.
                self._stats["backplane_failures"] += 1
                log.debug("hub %r: backplane unavailable: %s", self.name, exc)
            except Exception:
                log.exception("hub %r: backplane broadcast failed", self.name)
        return item

    def _fan_out_batch(self, batch: list[_Item], dirty: list[_Member]) -> None:
        """Fan out ``batch`` (emptied) in order: each maximal run of messages
        for every member (no exclude, no where) as one joined chunk, the
        others one by one."""
        items = batch[:]
        batch.clear()  # a kill mid-fan-out must not fan these out again
        run: list[Message] = []
        for message, exclude, where, arity, _ in items:
            if exclude is None and where is None:
                run.append(message)
                continue
            if run:
                self._fan_out_run(run, dirty)
                run = []
            self._fan_out(prepare(message), exclude, where, arity, dirty)
        if run:
            self._fan_out_run(run, dirty)

    def _flush(self, dirty: list[_Member]) -> None:
        """One send per member that got frames in this batch."""
        for i, m in enumerate(dirty):
            m.batched = 0
            m.ws.flush()
            if i % _FLUSH_YIELD == _FLUSH_YIELD - 1:
                gevent.sleep(0)  # a huge room must not hog the loop
        dirty.clear()

    def _fan_out(self, pm: PreparedMessage, exclude: frozenset[WebSocket] | None,
                 where: Where | None, arity: int, dirty: list[_Member]) -> None:
        self._stats["fanned_out"] += 1
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple(self._members.values())
        delivered = since_yield = 0
        for m in snapshot:
            ws = m.ws
            if exclude is not None and ws in exclude:
                continue
            if where is not None:
                try:
                    if not (where(ws) if arity == 1 else where(ws, m.key)):
                        continue
                except Exception:
                    log.exception("hub %r: where predicate failed; member skipped", self.name)
                    continue
            try:
                delivered += self._push_one(m, pm, dirty)
            except Closed:
                self._remove(ws)  # closing; on_close will find it gone
            since_yield += 1
            if since_yield >= _YIELD_DELIVERIES:
                since_yield = 0
                gevent.sleep(0)  # a huge room must not hog the loop
                if self._stopped:
                    break
        self._stats["deliveries"] += delivered

    def _fan_out_run(self, messages: list[Message], dirty: list[_Member]) -> None:
        """Consecutive messages every member takes: one chunk per member.

        Their frames are joined once into :class:`~gstream.websocket.PreparedRun`
        objects of at most ``_RUN_BYTES`` (a longer frame goes alone) that
        every frame-sharing member queues with one call each.
        """
        group: list[PreparedMessage] = []
        size = 0
        for message in messages:
            pm = prepare(message)
            if group and size + len(pm.frame) > _RUN_BYTES:
                self._fan_out_group(group, dirty)
                group = []
                size = 0
            group.append(pm)
            size += len(pm.frame)
        self._fan_out_group(group, dirty)

    def _fan_out_group(self, pms: list[PreparedMessage], dirty: list[_Member]) -> None:
        """One run to every member. A member without room for it (a writer
        waits for its peer, or its queue before this batch is full) takes
        the per-frame path instead, so the slow-member policy acts exactly
        as it would have message by message."""
        if len(pms) == 1:
            self._fan_out(pms[0], None, None, 0, dirty)
            return
        self._stats["fanned_out"] += len(pms)
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple(self._members.values())
        run = prepare_run(pms)
        count = len(pms)
        delivered = since_yield = 0
        for m in snapshot:
            ws = m.ws
            try:
                if m.shares and ws.push_shared_run(run, m.batched):
                    delivered += count
                    if not m.batched:
                        dirty.append(m)
                    m.batched += count
                    since_yield += 1
                else:
                    delivered += self._push_each(m, pms, dirty)
                    since_yield += count
            except Closed:
                self._remove(ws)  # closing; on_close will find it gone
            if since_yield >= _YIELD_DELIVERIES:
                since_yield = 0
                gevent.sleep(0)  # a huge room must not hog the loop
                if self._stopped:
                    break
        self._stats["deliveries"] += delivered

    def _push_each(self, m: _Member, pms: list[PreparedMessage], dirty: list[_Member]) -> int:
        """A run's messages to one member, one at a time (``_fan_out``'s path);
        returns how many were queued. Raises :class:`Closed` once closing."""
        return sum(self._push_one(m, pm, dirty) for pm in pms)

    def _push_one(self, m: _Member, pm: PreparedMessage, dirty: list[_Member]) -> int:
        """One message to one member (1 if queued, else the slow policy's answer);
        raises :class:`Closed` once closing."""
        ws = m.ws
        if not m.shares:
            if ws.try_send_prepared(pm):  # deflate: encodes and flushes on its own
                return 1
            return self._slow(m, pm)
        # This batch's own frames do not count against send_buffer (they leave
        # in one send at the batch's end): a member holds at most
        # send_buffer + _BATCH_MESSAGES frames.
        frame = pm.frame
        if ws.push_shared(frame, m.batched) or self._push_after_flush(m, frame) or self._slow(m, pm):
            if not m.batched:
                dirty.append(m)
            m.batched += 1
            return 1
        return 0

    @staticmethod
    def _push_after_flush(m: _Member, frame: bytes) -> bool:
        """A buffer full of this batch's own frames: send them, then retry.

        Only a kernel buffer that stays full makes a member slow; a batch
        longer than ``send_buffer`` must not.
        """
        if not m.batched:
            return False
        m.ws.flush()
        return m.ws.push_shared(frame)

    def _slow(self, m: _Member, pm: Any) -> int:
        """Apply the slow-member policy; return 1 if the message was queued."""
        policy = self.config.slow_policy
        ws = m.ws
        if policy == SlowPolicy.DROP_OLDEST and ws.shares_frames:
            lost = ws.send_prepared_drop_oldest(pm)
            m.drops += lost
            self._stats["member_drops"] += lost
            return 1
        m.drops += 1
        self._stats["member_drops"] += 1
        if policy == SlowPolicy.CLOSE:
            self._stats["closed_slow"] += 1
            self._remove(ws)
            log.info("hub %r: closing slow member %r with %s", self.name, ws, self.config.close_code)
            ws.close(self.config.close_code, self.config.close_reason, wait=False)
        return 0

    def start(self) -> gevent.Greenlet:
        """Spawn :meth:`run` in a greenlet (once); return that greenlet."""
        if self._started is None or (self._started.dead and not self._stopped):
            self._started = gevent.spawn(self.run)
        return self._started

    # -- membership ------------------------------------------------------------

    def register(self, ws: WebSocket, *, key: Any = None, meta: Any = None,
                 presence_events: bool = True) -> bool:
        """Add ``ws`` (with an optional ``key``, e.g. a user id, for ``where``).

        Never blocks (from a native thread it waits for the hub's thread).
        Returns False, changing nothing, after :meth:`stop`, for a connection
        that is no longer open, at ``max_members``, or when the presence
        refuses it (``presence_refused``). Registering again only updates the
        key (and its presence entry, and its meta when one is given: an
        ``update`` presence event). The connection leaves by itself when
        it closes. With a presence, ``str(key)`` is the member id and
        ``meta`` (a JSON value) is listed with it; ``presence_events=False``
        spares this member the presence messages (``HubConfig.presence_events``).
        """
        if not self._binding.here():
            return self._binding.call(self._register, ws, key, meta, presence_events,
                                      timeout=_THREAD_CALL_TIMEOUT)
        return self._register(ws, key, meta, presence_events)

    def _register(self, ws: WebSocket, key: Any, meta: Any = None,
                  presence_events: bool = True) -> bool:
        if self._stopped or not ws.open:
            return False
        m = self._members.get(ws)
        if m is not None:
            if (self._presence is not None and (key != m.key or meta is not None)
                    and not self._rejoin_presence(m, key, meta)):
                return False
            m.key = key
            return True
        if self.config.max_members and len(self._members) >= self.config.max_members:
            self._stats["rejected"] += 1
            return False
        m = _Member(ws, key)
        if self._presence is not None and not self._join_presence(m, key, meta):
            return False
        self._members[ws] = m
        if not presence_events:
            m.deaf = True
        elif self._presence is not None and self.config.presence_events:
            gevent.spawn(self._send_sync, ws)
        self._snapshot = None
        self._stats["registered"] += 1
        if ws not in self._hooked:
            # One close callback per connection for the hub's lifetime, however
            # often it re-registers: no watcher greenlet, nothing piles up.
            self._hooked.add(ws)
            ws.on_close(self._remove)
        return True

    def unregister(self, ws: WebSocket) -> None:
        """Remove ``ws`` (it is not closed). A no-op if absent or after :meth:`stop`."""
        if not self._binding.here():
            self._binding.call(self._remove, ws, timeout=_THREAD_CALL_TIMEOUT)
            return
        self._remove(ws)

    def _remove(self, ws: WebSocket) -> None:
        m = self._members.pop(ws, None)
        if m is not None:
            self._snapshot = None
            self._stats["unregistered"] += 1
            if m.presence is not None and self._presence is not None:
                self._presence.leave(m.presence)
                m.presence = None

    # -- presence (docs/presence.md) -------------------------------------------

    def _join_presence(self, m: _Member, key: Any, meta: Any) -> bool:
        assert self._presence is not None
        member = str(key) if key is not None else f"anon:{secrets.token_hex(6)}"
        try:
            m.presence = self._presence.join(self.name, member, meta)
        except PresenceRefused as exc:
            self._stats["presence_refused"] += 1
            log.info("hub %r: %s", self.name, exc)
            return False
        return True

    def _rejoin_presence(self, m: _Member, key: Any, meta: Any) -> bool:
        """A registered member registers again: swap its presence entry (join, then leave
        the old one). At a connection cap (the member's own with the same key, or this
        process's) the old entry leaves first: a swap adds no connection."""
        assert self._presence is not None
        old = m.presence
        member = str(key) if key is not None else f"anon:{secrets.token_hex(6)}"
        try:
            m.presence = self._presence.join(self.name, member, meta)
        except PresenceRefused as exc:
            swap = old is not None and (
                exc.reason == "local" or (exc.reason == "connections" and key == m.key))
            if not swap:
                self._stats["presence_refused"] += 1
                log.info("hub %r: %s", self.name, exc)
                return False
            assert old is not None
            self._presence.leave(old)
            m.presence = None
            return self._join_presence(m, key, meta)
        if old is not None:
            self._presence.leave(old)
        return True

    def _local(self, payload: str, where: Where | None = None) -> None:
        # To this process's members only: every process's hub gets the
        # presence events itself, from its own presence watch.
        self._enqueue(self._item(payload, None, where, False))

    def _on_presence(self, event: PresenceEvent) -> None:
        if not self._stopped:
            self._local(json.dumps({"type": "presence", **event.as_dict()},
                                   separators=(",", ":"), ensure_ascii=False),
                        self._listens)  # decided at fan-out: members may register meanwhile

    def _listens(self, ws: WebSocket) -> bool:
        m = self._members.get(ws)
        return m is not None and not m.deaf

    def _resync(self) -> None:
        # Events were missed: every listening member gets a fresh list.
        gevent.spawn(self._send_sync, None)

    def _send_sync(self, ws: WebSocket | None) -> None:
        # Its own greenlet: reading a shared presence store may wait.
        # ``ws`` None: to every listening member.
        if self._presence is None or self._stopped or (ws is not None and ws not in self._members):
            return
        try:
            snapshot = self._presence.members(self.name)
        except BackplaneUnavailable as exc:
            log.warning("hub %r: presence list unavailable: %s", self.name, exc)
            return
        payload = json.dumps({"type": "presence", **snapshot.as_dict()},
                             separators=(",", ":"), ensure_ascii=False)
        self._local(payload, self._listens if ws is None else lambda w: w is ws)

    def _require_presence(self) -> Presence:
        if self._presence is None:
            raise RuntimeError("this hub has no presence (HubConfig.presence)")
        return self._presence

    def presence_members(self) -> PresenceSnapshot:
        """The members of this room (all processes) and the presence version.

        Raises:
            RuntimeError: the hub has no presence.
            BackplaneUnavailable: the shared presence could not be read.
        """
        return self._require_presence().members(self.name)

    def presence_count(self) -> int:
        """Members of this room (all processes; a member with two tabs counts once).

        Raises:
            RuntimeError: the hub has no presence.
            BackplaneUnavailable: the shared presence could not be read.
        """
        return self._require_presence().count(self.name)

    # -- broadcasting ----------------------------------------------------------

    def _item(self, message: Message, exclude: Any, where: Where | None,
              forward: bool) -> _Item:
        if isinstance(message, (bytearray, memoryview)):
            message = bytes(message)  # frozen now: a later mutation cannot reach members
        elif not isinstance(message, (str, bytes)):
            raise TypeError(f"broadcast() takes str or bytes, not {type(message).__name__}")
        return (message, _excluded(exclude), where, _arity(where) if where is not None else 0,
                forward and where is None)

    def _enqueue(self, item: _Item, count_drop: bool = True) -> bool:
        # Runs in any thread: only atomic deque operations and a threadsafe wake.
        if self._stopped:
            return False
        if len(self._channel) >= self.config.broadcast_buffer:
            if count_drop:
                self._stats["drops"] += 1
            return False
        self._channel.append(item)
        self._stats["broadcasts"] += 1
        if self._binding.here():
            self._wake.set()
        elif not self._wake_pending:
            self._wake_pending = True
            self._binding.call_soon(self._wake_from_loop)
        return True

    def _wake_from_loop(self) -> None:
        self._wake_pending = False
        self._wake.set()

    def _signal_room(self) -> None:
        self._room.set()
        while self._thread_waiters:
            self._thread_waiters.pop().release()

    def broadcast(self, message: Message, *, exclude: Any = None,
                  where: Where | None = None) -> bool:
        """Queue ``message`` for every member; never blocks.

        A ``str`` goes out as a text frame, ``bytes`` as binary. ``exclude``
        is a connection or a collection of them (e.g. the sender);
        ``where(ws)`` or ``where(ws, key)`` selects members (``key`` as given
        to :meth:`register`). Returns False (the message is dropped and
        counted in ``drops``) when the broadcast channel is full, and after
        :meth:`stop`. From a native thread, True means queued for the hub.
        """
        if self._stopped:
            return False
        return self._enqueue(self._item(message, exclude, where, True))

    def broadcast_wait(self, message: Message, *, exclude: Any = None,
                       where: Where | None = None, timeout: float | None = None) -> bool:
        """Like :meth:`broadcast`, but wait (up to ``timeout`` s) for room in the channel.

        Waits for the message to be queued, not delivered. Returns False
        after :meth:`stop` (also while waiting) or on timeout.
        """
        if self._stopped:
            return False
        item = self._item(message, exclude, where, True)
        deadline = None if timeout is None else time.monotonic() + timeout
        here = self._binding.here()
        while not self._stopped:
            if here:
                self._room.clear()
            else:
                lock = allocate_lock()
                lock.acquire()
                self._thread_waiters.append(lock)
            if self._enqueue(item, count_drop=False):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if here:
                self._room.wait(remaining)
            else:
                lock.acquire(True, -1 if remaining is None else remaining)
        return False

    def _deliver_remote(self, payload: Message) -> bool:
        """The backplane's sink: a message broadcast by another process's hub."""
        if self._stopped:
            return False
        self._stats["remote"] += 1
        return self._enqueue(self._item(payload, None, None, False))

    # -- stopping --------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> bool:
        """Close every member with 1001 (going away), end :meth:`run`, refuse new work.

        Works whether or not :meth:`run` ever started; messages still in the
        channel are discarded (counted). Only the first call acts. Without
        ``timeout`` it returns at once; with one, it waits up to ``timeout``
        seconds for the members' closing handshakes and for ``run()`` to
        return, aborts members still open then, and returns False if any
        had to be aborted (True otherwise).
        """
        if not self._binding.here():
            bound = _THREAD_CALL_TIMEOUT + (timeout or 0.0)
            return self._binding.call(self.stop, timeout, timeout=bound)
        if not self._stopped:
            self._stopped = True
            self._stats["discarded"] += len(self._channel)
            self._channel.clear()
            members = list(self._members)
            for unwatch in self._unwatch:
                unwatch()
            if self._presence is not None:
                for m in self._members.values():
                    if m.presence is not None:
                        self._presence.leave(m.presence)
                        m.presence = None
            self._members.clear()
            self._snapshot = None
            self._closing = members
            self._wake.set()
            self._signal_room()
            if self._backplane is not None:
                try:
                    self._backplane.close()
                except Exception:
                    log.exception("hub %r: backplane close failed", self.name)
            for ws in members:
                try:
                    ws.close(1001, "going away", wait=False)  # never blocks
                except Exception:
                    log.exception("hub %r: closing %r failed", self.name, ws)
            if self._runner is None:
                self._done.set()
        if timeout is None:
            return True
        deadline = time.monotonic() + timeout
        if self._runner is not None and self._runner is not gevent.getcurrent():
            self._done.wait(timeout)
        late = [ws for ws in self._closing
                if not ws.wait_closed(max(0.0, deadline - time.monotonic()))]
        for ws in late:
            ws.abort("hub stop timeout")
        self._closing = [ws for ws in late if not ws.wait_closed(0)]
        return not late

    # -- introspection ---------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopped

    @property
    def running(self) -> bool:
        """True while :meth:`run` is executing."""
        return self._runner is not None

    @property
    def members(self) -> list[WebSocket]:
        """The registered connections (a copy)."""
        return list(self._members)

    @property
    def count(self) -> int:
        """Number of registered connections (0 after :meth:`stop`)."""
        return len(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, ws: object) -> bool:
        return ws in self._members

    def __iter__(self) -> Iterator[WebSocket]:
        return iter(list(self._members))

    def key_of(self, ws: WebSocket) -> Any:
        """The ``key`` ``ws`` was registered with (None if absent)."""
        m = self._members.get(ws)
        return None if m is None else m.key

    def member_drops(self, ws: WebSocket) -> int:
        """Messages ``ws`` lost to the slow-member policy while a member."""
        m = self._members.get(ws)
        return 0 if m is None else m.drops

    def stats(self) -> HubStats:
        """Counters since creation (:class:`HubCounters`) and the state now; a plain dict."""
        return HubStats(**self._stats, name=self.name, members=len(self._members),
                        queued=len(self._channel), running=self.running, stopped=self._stopped)

    def __repr__(self) -> str:
        return f"<Hub {self.name!r} members={len(self._members)} stopped={self._stopped}>"
