"""Shared parts of :mod:`gstream.contrib.locust`: accounting, reporting, owned greenlets.

Private to the package: import the public names from :mod:`gstream.contrib.locust`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import gevent
import locust
from locust import User
from locust.exception import StopUser
from locust.user.task import LOCUST_STATE_RUNNING, LOCUST_STATE_STOPPING, LOCUST_STATE_WAITING

log = logging.getLogger("gstream.locust")


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


class StreamingUser(User):
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
