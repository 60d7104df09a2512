"""The WebSocket user of :mod:`gstream.contrib.locust` (import it from there)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping
from typing import Any

import gevent
import gevent.event

from ...client.websocket import WebSocketClient, connect
from ...errors import Closed, Disconnected
from ._base import StreamingUser

__all__ = ["WebSocketUser"]


class WebSocketUser(StreamingUser):
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
        sent = ws.sent_close_code
        if code == 1006 and sent is not None and sent not in (1000, 1001):
            # The client failed the connection itself (1009 too big, 1007 bad UTF-8).
            return Disconnected(f"closed with code {sent} by the client")
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
