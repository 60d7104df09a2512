"""Locust users for Server-Sent Events and WebSocket servers.

Locust runs on gevent, so gstream's gevent-native clients fit it without
threads. :class:`SSEUser` and :class:`WebSocketUser` report to Locust's
statistics the way ``HttpUser`` does (``environment.events.request``), under
``request_type`` ``"SSE"`` and ``"WS"``:

========== ===================== ==========================================
type       name                  response time / meaning
========== ===================== ==========================================
SSE, WS    ``connect``           until the response head (SSE) or the end
                                 of the handshake (WS); failures: refused,
                                 HTTP errors, timeouts
SSE        ``first_event``       from the start of a connection to its first
                                 event (compare with ``connect``: a buffering
                                 proxy shows up here)
SSE        ``event``             delivery latency: now minus the publish
                                 timestamp in the event's data (``ts``), 0
                                 when there is none; size = data length
SSE        ``missed``            a failure per gap in numeric event ids;
                                 size = number of events missed
SSE        ``duplicate``         a failure per id not above the last one
SSE, WS    ``reconnect``         downtime: from losing a connection to the
                                 next one being open
SSE, WS    ``disconnect``        a failure when an open connection breaks
                                 (WS: closed with a code other than 1000/1001)
WS         ``rtt``               round trip of :meth:`WebSocketUser.request`
                                 (send with a ``ref``, wait for the reply
                                 carrying it)
WS         ``message``           a message that answers no request: latency
                                 from its ``ts`` as for SSE events
WS         ``send``, ``ping``    time to write a message; ping round trip
========== ===================== ==========================================

Each long-lived connection is read by a greenlet the user owns, not by its
tasks, so the user's tasks and Locust's scheduling go on while streams are
open. Those greenlets end with the user (``on_stop``, or when Locust kills
it), and a user with no task of its own only holds its streams in a wait that
Locust may interrupt at once, so users stop promptly when the test ends.

Install with ``pip install gstream[locust]``. Not imported by ``gstream``.
"""

from __future__ import annotations

try:
    import locust
    from locust import User
    from locust.exception import StopUser
    from locust.user.task import LOCUST_STATE_RUNNING, LOCUST_STATE_STOPPING, LOCUST_STATE_WAITING
except ImportError as _exc:  # pragma: no cover - exercised without locust installed
    raise ImportError(
        "gstream.locust needs Locust; install it with: pip install 'gstream[locust]'"
    ) from _exc

import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import gevent
import gevent.event
from gevent import GreenletExit

from .client._http import HTTPError
from .client.sse import SSEClient
from .client.websocket import WebSocketClient, connect
from .errors import Closed
from .sseparse import ParsedEvent

__all__ = [
    "SSEUser",
    "WebSocketUser",
    "StreamCounters",
    "stream_counters",
    "MissedEvents",
    "DuplicateEvent",
    "json_timestamp",
]

log = logging.getLogger("gstream.locust")


class MissedEvents(Exception):
    """Reported (as the failure of ``missed``) when event ids skip numbers."""


class DuplicateEvent(Exception):
    """Reported (as the failure of ``duplicate``) when an event id repeats or goes back."""


class Disconnected(Exception):
    """Reported (as the failure of ``disconnect``) when an open connection breaks."""


# -- process-wide accounting ----------------------------------------------


@dataclass
class StreamCounters:
    """Long-lived connection accounting that Locust's request statistics lack.

    One instance per :class:`locust.env.Environment` (see :func:`stream_counters`).
    In distributed mode every worker sends its counters with its reports and
    the master's :meth:`totals` adds them up.
    """

    open: int = 0
    """Connections open now (a gauge)."""
    connects: int = 0
    """Connections opened (first connections and reconnects)."""
    reconnects: int = 0
    """Connections opened again after an earlier one of the same stream was lost."""
    disconnects: int = 0
    """Open connections that ended (cleanly or not), user stops excluded."""
    errors: int = 0
    """Failed connection attempts and broken connections."""
    events: int = 0
    """SSE events and WebSocket messages received."""
    missed: int = 0
    """Events missing from id sequences (sum of the gaps)."""
    duplicates: int = 0
    """Events whose id was not above the previous one."""
    bytes_received: int = 0
    """Event data / message bytes received."""
    workers: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    def snapshot(self) -> dict[str, int]:
        """This process's counters as a dict."""
        data = asdict(self)
        data.pop("workers")
        return data

    def totals(self) -> dict[str, int]:
        """This process's counters plus the latest report of every worker."""
        total = self.snapshot()
        for report in self.workers.values():
            for key, value in report.items():
                if key in total:
                    total[key] += value
        return total


def stream_counters(environment: Any) -> StreamCounters:
    """Return the :class:`StreamCounters` of ``environment`` (created on first use)."""
    counters: StreamCounters | None = getattr(environment, "gstream_counters", None)
    if counters is None:
        counters = StreamCounters()
        environment.gstream_counters = counters
        events = environment.events

        def report(client_id: str, data: dict[str, Any]) -> None:
            data["gstream"] = counters.snapshot()

        def worker_report(client_id: str, data: dict[str, Any]) -> None:
            if "gstream" in data:
                counters.workers[client_id] = data["gstream"]

        def test_stop(environment: Any, **_kw: Any) -> None:
            runner = getattr(environment, "runner", None)
            if runner is not None and type(runner).__name__ == "WorkerRunner":
                return
            totals = counters.totals()
            if totals["connects"] or totals["errors"]:
                log.info("gstream streams: %s", " ".join(f"{k}={v}" for k, v in totals.items()))

        events.report_to_master.add_listener(report)
        events.worker_report.add_listener(worker_report)
        events.test_stop.add_listener(test_stop)
    return counters


@locust.events.init.add_listener
def _on_init(environment: Any, **_kw: Any) -> None:
    # The master runs no users; install its counters so worker reports add up.
    stream_counters(environment)


# -- shared helpers ---------------------------------------------------------


def json_timestamp(data: str | bytes, field_name: str = "ts") -> float | None:
    """Return ``data[field_name]`` (unix seconds) when ``data`` is a JSON object, else None."""
    if not data or data[:1] not in ("{", b"{"):
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    value = obj.get(field_name) if isinstance(obj, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _hold(user: Any) -> None:
    """Keep the user's streams open: a one-second wait Locust may interrupt at once.

    Marking the user as waiting (as ``TaskSet.wait`` does) lets the runner kill
    it immediately at the end of a test, even with a ``stop_timeout``.
    """
    if user._state == LOCUST_STATE_STOPPING:
        raise StopUser()
    user._state = LOCUST_STATE_WAITING
    gevent.sleep(user.hold_interval)
    if user._state == LOCUST_STATE_STOPPING:
        raise StopUser()
    user._state = LOCUST_STATE_RUNNING


_hold._gstream_hold = True  # type: ignore[attr-defined]


class _StreamingUser(User):
    """What SSEUser and WebSocketUser share: reporting, owned greenlets, the hold task."""

    abstract = True
    request_type: ClassVar[str] = ""
    stat_prefix: str = ""
    """Prefixed to every statistic name (e.g. ``"feed "`` gives ``feed connect``)."""
    timestamp_field: str | None = "ts"
    """JSON field of the data carrying the publish time (unix seconds); None: no latency."""
    hold_interval: float = 1.0
    """Seconds of each wait of the default task (users without tasks of their own)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A user with tasks of its own runs them; one without just holds its streams.
        own = [t for t in cls.tasks if not getattr(t, "_gstream_hold", False)]
        cls.tasks = own or [_hold]

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.counters = stream_counters(environment)
        """The environment's :class:`StreamCounters`."""
        self._owned: list[gevent.Greenlet] = []
        self._stopping = False

    def url_for(self, path: str, websocket: bool = False) -> str:
        """``path`` joined to the user's ``host``; ``ws(s)://`` when ``websocket``."""
        if "://" in path:
            return path
        base = (self.host or "").rstrip("/")
        if websocket:
            if base.startswith("https://"):
                base = "wss://" + base[8:]
            elif base.startswith("http://"):
                base = "ws://" + base[7:]
        return base + "/" + path.lstrip("/")

    def report(self, name: str, response_time: float, response_length: int = 0,
               exception: BaseException | None = None) -> None:
        """Fire one Locust request event (``request_type`` is "SSE" or "WS")."""
        self.environment.events.request.fire(
            request_type=self.request_type, name=self.stat_prefix + name,
            response_time=response_time, response_length=response_length,
            exception=exception, context=self.context(),
        )

    def spawn_owned(self, func: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Run ``func`` in a greenlet that is killed when this user stops."""
        g = gevent.spawn(func, *args)
        self._owned.append(g)
        g.link(lambda done: self._owned.remove(done) if done in self._owned else None)
        return g

    def start(self, group: Any) -> Any:
        """Start the user's greenlet (Locust calls this); streams end with it."""
        greenlet = super().start(group)
        # Even a subclass whose on_stop forgets super() must not leak streams.
        greenlet.link(lambda _g: self._shutdown())
        return greenlet

    def on_stop(self) -> None:
        """Close every stream and kill the reading greenlets (call super() when overriding)."""
        self._shutdown()

    def _close_connections(self) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        self._stopping = True
        try:
            self._close_connections()
        finally:
            owned, self._owned = self._owned, []
            gevent.killall(owned, block=True, timeout=2)

    def _user_error(self, exc: Exception) -> None:
        # A bug in a hook must show, and must not end the stream it ran in.
        log.error("error in a %s hook: %r", type(self).__name__, exc, exc_info=exc)
        self.environment.events.user_error.fire(user_instance=self, exception=exc,
                                                tb=exc.__traceback__)

    def latency_ms(self, data: str | bytes) -> float:
        """Delivery latency in ms from the data's timestamp (0 without one).

        Override :meth:`event_timestamp` / :meth:`message_timestamp` to read
        timestamps from somewhere else.
        """
        if self.timestamp_field is None:
            return 0.0
        ts = json_timestamp(data, self.timestamp_field)
        return max(0.0, (time.time() - ts) * 1000.0) if ts is not None else 0.0


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
        user.report(user.event_stat_name(event), user.event_latency_ms(event), size)
        user.on_event(event)

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


class SSEUser(_StreamingUser):
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

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.sse_streams: list[_SSEStream] = []
        """The user's open streams (their ``client`` is a :class:`gstream.client.SSEClient`)."""

    def on_start(self) -> None:
        """Open ``streams`` streams when ``autostart`` (call super() when overriding)."""
        if self.autostart:
            for _ in range(self.streams):
                self.open_stream()

    def open_stream(self, path: str | None = None, *, headers: Mapping[str, str] | None = None,
                    last_event_id: str | None = None) -> SSEClient:
        """Open one more stream (read by an owned greenlet); returns its client."""
        stream = _SSEStream(self, self.url_for(path or self.path),
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

    def event_latency_ms(self, event: ParsedEvent) -> float:
        """Delivery latency of ``event`` in ms (default: from ``timestamp_field`` of JSON data)."""
        return self.latency_ms(event.data)

    def event_stat_name(self, event: ParsedEvent) -> str:
        """The statistic name an event is reported under (default ``"event"``)."""
        return "event"

    def on_event(self, event: ParsedEvent) -> None:
        """Called for every event after it was reported (in the stream's greenlet)."""


# -- WebSocket ----------------------------------------------------------------


class WebSocketUser(_StreamingUser):
    """A Locust user with one WebSocket connection, read by a greenlet it owns.

    The connection opens on start (``connect``) and, when ``reconnect``, again
    after it breaks (``disconnect``, ``reconnect``). Tasks use :meth:`send`,
    :meth:`request` (a round trip correlated by a ``ref`` field, reported as
    ``rtt``) and :meth:`ping`; messages that answer no request are reported as
    ``message`` with their delivery latency and size and passed to
    :meth:`on_message`. Example::

        class Chatter(WebSocketUser):
            path = "/chat"
            wait_time = between(1, 2)

            @task
            def say(self):
                self.request({"text": "hello"})   # waits for its own broadcast

    A subclass without tasks only listens.
    """

    abstract = True
    request_type = "WS"
    path: str = "/echo"
    """The WebSocket path (or full ``ws://`` URL)."""
    connect_options: Mapping[str, Any] = {}
    """Extra arguments of :func:`gstream.client.connect` (subprotocols, origin, headers...)."""
    autostart: bool = True
    """Connect in :meth:`on_start` (else call :meth:`start_session`)."""
    reconnect: bool = True
    """Connect again after the connection breaks or closes."""
    reconnect_delay: float = 1.0
    """Seconds before connecting again (doubles per failed attempt, up to 30 s)."""
    connect_timeout: float = 10.0
    """Seconds for TCP connect and handshake."""
    request_timeout: float = 10.0
    """Seconds :meth:`request` waits for its reply."""
    ref_field: str = "ref"
    """JSON field correlating a request and its reply."""

    _refs = itertools.count(1)

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.ws: WebSocketClient | None = None
        """The open connection (None while disconnected)."""
        self._connected = gevent.event.Event()
        self._pending: dict[str, gevent.event.AsyncResult] = {}
        self._session_greenlet: gevent.Greenlet | None = None

    def on_start(self) -> None:
        """Connect when ``autostart`` (call super() when overriding)."""
        if self.autostart:
            self.start_session()

    def start_session(self) -> None:
        """Connect (and keep reconnecting) in an owned greenlet; a no-op while one runs."""
        if self._session_greenlet is None or self._session_greenlet.dead:
            self._session_greenlet = self.spawn_owned(self._session)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the connection is open; False after ``timeout``."""
        return self._connected.wait(self.connect_timeout if timeout is None else timeout)

    def _close_connections(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                with gevent.Timeout(1.0):
                    ws.close(1001, "load test user stopping")
            except (gevent.Timeout, Closed, OSError):
                ws.abort()

    def _session(self) -> None:
        url = self.url_for(self.path, websocket=True)
        lost_at: float | None = None
        failures = 0
        while not self._stopping:
            start = time.perf_counter()
            try:
                ws = connect(url, open_timeout=self.connect_timeout, close_timeout=2.0,
                             **dict(self.connect_options))
            except Exception as exc:
                self.counters.errors += 1
                self.report("connect", (time.perf_counter() - start) * 1000.0, exception=exc)
                failures += 1
            else:
                now = time.perf_counter()
                failures = 0
                self.counters.open += 1
                self.counters.connects += 1
                self.report("connect", (now - start) * 1000.0)
                if lost_at is not None:
                    self.counters.reconnects += 1
                    self.report("reconnect", (now - lost_at) * 1000.0)
                self.ws = ws
                self._connected.set()
                try:
                    error = self._read(ws)
                finally:  # also when the user's end kills this greenlet
                    self._connected.clear()
                    self.counters.open -= 1
                if self._stopping:
                    return
                self.ws = None
                lost_at = time.perf_counter()
                self.counters.disconnects += 1
                if error is not None:
                    self.counters.errors += 1
                    self.report("disconnect", 0.0, exception=error)
            if not self.reconnect:
                return
            gevent.sleep(min(30.0, self.reconnect_delay * 2 ** min(max(failures - 1, 0), 5)))

    def _read(self, ws: WebSocketClient) -> Exception | None:
        """Dispatch messages until the connection closes; the failure to report, if any."""
        try:
            while True:
                message = ws.recv()
                self._dispatch(message, time.perf_counter())
        except Closed as exc:
            code = exc.code
        finally:
            for waiter in self._pending.values():
                waiter.set_exception(Closed("connection closed before the reply", ws.close_code))
            self._pending.clear()
        if code in (1000, 1001) or self._stopping:
            return None
        # A stable text per code keeps Locust's failure table grouped by cause.
        sent = getattr(ws._protocol, "close_sent", None)
        if code == 1006 and sent is not None and sent.code not in (1000, 1001):
            # The client failed the connection itself (1009 too big, 1007 bad UTF-8).
            return Disconnected(f"closed with code {sent.code} by the client")
        return Disconnected(f"closed with code {code}")

    def _dispatch(self, message: str | bytes, received: float) -> None:
        size = len(message)
        self.counters.events += 1
        self.counters.bytes_received += size
        data: Any = None
        if message[:1] in ("{", b"{"):
            try:
                data = json.loads(message)
            except ValueError:
                data = None
        ref = data.get(self.ref_field) if isinstance(data, dict) else None
        waiter = self._pending.pop(str(ref), None) if ref is not None else None
        if waiter is not None:
            waiter.set((message, data, received))
        try:
            if waiter is None:
                self.report(self.message_stat_name(message, data),
                            self.message_latency_ms(message, data), size)
            self.on_message(message, data)
        except Exception as exc:
            self._user_error(exc)

    def _require(self) -> WebSocketClient:
        session = self._session_greenlet
        if self.ws is None and (session is None or session.dead):
            raise Closed("not connected", 1006)  # nobody is connecting: don't wait
        if self.ws is None and not self.wait_connected():
            raise Closed("not connected", 1006)
        ws = self.ws
        if ws is None:
            raise Closed("not connected", 1006)
        return ws

    def send(self, message: str | bytes | Mapping[str, Any], *, name: str = "send") -> bool:
        """Send ``message`` (a mapping is sent as JSON); report ``send``; False on failure.

        Waits up to ``connect_timeout`` for the connection when it is not open.
        """
        start = time.perf_counter()
        payload = json.dumps(message) if isinstance(message, Mapping) else message
        try:
            self._require().send(payload)
        except Closed as exc:
            self.report(name, (time.perf_counter() - start) * 1000.0, len(payload), exc)
            return False
        self.report(name, (time.perf_counter() - start) * 1000.0, len(payload))
        return True

    def request(self, message: Mapping[str, Any], *, name: str = "rtt",
                timeout: float | None = None) -> Any:
        """Send ``message`` as JSON with a fresh ``ref``; wait for the reply carrying it.

        Reports the round trip as ``name`` (failures: timeout, connection
        closed). Returns the reply's parsed JSON, or None on failure.
        """
        ref = f"{id(self):x}-{next(self._refs)}"
        payload = json.dumps({**message, self.ref_field: ref})
        waiter = gevent.event.AsyncResult()
        start = time.perf_counter()
        try:
            ws = self._require()
            self._pending[ref] = waiter
            ws.send(payload)
            _message, data, received = waiter.get(
                timeout=self.request_timeout if timeout is None else timeout)
        except gevent.Timeout:
            self._pending.pop(ref, None)
            self.report(name, (time.perf_counter() - start) * 1000.0,
                        exception=TimeoutError("no reply in time"))
            return None
        except Closed as exc:
            self._pending.pop(ref, None)
            self.report(name, (time.perf_counter() - start) * 1000.0, exception=exc)
            return None
        self.report(name, (received - start) * 1000.0, len(_message))
        return data

    def ping(self, *, name: str = "ping", timeout: float = 10.0) -> float | None:
        """Send a ping and report the pong's round trip; returns it in seconds (None on failure)."""
        start = time.perf_counter()
        try:
            rtt = self._require().ping().get(timeout=timeout)
        except (gevent.Timeout, Closed) as exc:
            self.report(name, (time.perf_counter() - start) * 1000.0,
                        exception=TimeoutError("no pong in time") if isinstance(exc, gevent.Timeout) else exc)
            return None
        self.report(name, rtt * 1000.0)
        return float(rtt)

    def message_latency_ms(self, message: str | bytes, data: Any) -> float:
        """Delivery latency in ms of a message (default: ``timestamp_field`` of JSON data)."""
        if self.timestamp_field is None or not isinstance(data, dict):
            return 0.0
        ts = data.get(self.timestamp_field)
        return max(0.0, (time.time() - ts) * 1000.0) if isinstance(ts, (int, float)) else 0.0

    def message_stat_name(self, message: str | bytes, data: Any) -> str:
        """The statistic name of a message answering no request (default ``"message"``)."""
        return "message"

    def on_message(self, message: str | bytes, data: Any) -> None:
        """Called for every message (``data``: its parsed JSON or None), in the reader greenlet."""
