"""A gevent-native Server-Sent Events client with EventSource semantics.

HTTP/1.1 over :mod:`gevent.socket`, parsed by :class:`gstream.sseparse.EventStreamParser`,
reconnecting with ``Last-Event-ID`` as a browser does (plus ``5xx`` retries and
exponential back-off: docs/server.md, "gstream.client.SSEClient"). Example::

    client = SSEClient("http://127.0.0.1:8000/events")
    for event in client:
        print(event.event, event.data)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import gevent.event

from ..errors import HTTPError, SSEError
from ..sseparse import EventStreamParser, ParsedEvent
from ._http import ChunkedDecoder, open_socket, read_head, split_url

__all__ = ["SSEClient", "SSEError"]

log = logging.getLogger("gstream.client.sse")

_MAX_REDIRECTS = 5


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class _NoContent(Exception):
    pass


def _check_header(name: str, value: str) -> None:
    if any(c in name or c in value for c in "\r\n\0") or not name or ":" in name:
        raise ValueError(f"invalid header {name!r}")


class SSEClient:
    """Read an event stream, reconnecting and resuming like ``EventSource``.

    Iterate over the client to receive :class:`~gstream.sseparse.ParsedEvent`
    objects; iteration ends after :meth:`close`, on ``204 No Content``, or
    when reconnecting is disabled or exhausted after a clean end of stream.
    A connection error that cannot be retried any more is raised.

    Args:
        url: an ``http://`` or ``https://`` URL.
        headers: extra request headers.
        last_event_id: the id to resume from on the first connection.
        reconnect: reconnect when the stream ends or the connection fails.
        max_reconnects: give up after this many reconnects (``None``: never).
        timeout: seconds allowed to connect and read the response head.
        read_timeout: seconds without any byte (heartbeats count) after which
            the connection is considered dead and retried (``None``: wait forever).
        retry_default_ms: the reconnection delay until the server sends ``retry:``.
        max_retry_ms: upper bound of any delay (server ``retry:``, ``Retry-After``,
            backoff), so a hostile server cannot park the client.
        max_line: the longest event-stream line accepted (characters).
        ssl_context: an :class:`ssl.SSLContext` for ``https`` (default: verify).
        on_open: called as ``on_open(client)`` after each successful connect.
        on_event: called as ``on_event(client, event)`` before each event is yielded.
        on_error: called as ``on_error(client, exc)`` for each failed connection.

    The client may be iterated in one greenlet and closed from another.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        last_event_id: str | None = None,
        reconnect: bool = True,
        max_reconnects: int | None = None,
        timeout: float | None = 10.0,
        read_timeout: float | None = None,
        retry_default_ms: int = 3000,
        max_retry_ms: int = 30_000,
        max_line: int = 1 << 20,
        ssl_context: Any = None,
        on_open: Callable[[SSEClient], Any] | None = None,
        on_event: Callable[[SSEClient, ParsedEvent], Any] | None = None,
        on_error: Callable[[SSEClient, BaseException], Any] | None = None,
    ) -> None:
        self.url = url
        # Validate now so a bad URL fails at construction, not mid-iteration.
        split_url(url, ("https",), ("http",))
        self.headers = dict(headers or {})
        for name, value in self.headers.items():
            _check_header(name, value)
        self.last_event_id = last_event_id or ""
        """The id sent as ``Last-Event-ID`` on the next (re)connect."""
        self.reconnect = reconnect
        self.max_reconnects = max_reconnects
        self.timeout = timeout
        self.read_timeout = read_timeout
        self.retry_ms = retry_default_ms
        """The current reconnection delay in milliseconds (updated by ``retry:``)."""
        self.max_retry_ms = max_retry_ms
        self.max_line = max_line
        self.ssl_context = ssl_context
        self.on_open = on_open
        self.on_event = on_event
        self.on_error = on_error
        self.events_received = 0
        """Events dispatched so far (all connections)."""
        self.bytes_received = 0
        """Body bytes received so far (all connections)."""
        self.reconnects = 0
        """Reconnection attempts so far."""
        self.connects = 0
        """Successful connections (status 200 with an event stream) so far."""
        self.status: int | None = None
        """Status of the latest response."""
        self.response_headers: dict[str, str] = {}
        """Headers (lower-cased names) of the latest response."""
        self._sock: Any = None
        self._closed = False
        self._wake = gevent.event.Event()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the stream ended for good."""
        return self._closed

    def close(self) -> None:
        """Stop at once: close the socket and end iteration (any greenlet)."""
        self._closed = True
        self._wake.set()
        sock, self._sock = self._sock, None
        if sock is not None:
            # gevent wakes a greenlet blocked in recv() on this socket.
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[ParsedEvent]:
        return self.events()

    # -- connection ------------------------------------------------------

    def _request(self, host_header: str, target: str) -> bytes:
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {host_header}",
            "Accept: text/event-stream",
            "Cache-Control: no-cache",
            "User-Agent: gstream-sse-client",
        ]
        if self.last_event_id:
            lines.append(f"Last-Event-ID: {self.last_event_id}")
        lines.extend(f"{k}: {v}" for k, v in self.headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def _connect(self) -> tuple[Any, dict[str, str], bytes]:
        """Open the stream; return (socket, headers, first body bytes)."""
        url = self.url
        for _ in range(_MAX_REDIRECTS + 1):
            secure, host, port, target, host_header = split_url(url, ("https",), ("http",))
            sock = open_socket(host, port, secure=secure, timeout=self.timeout,
                               ssl_context=self.ssl_context)
            self._sock = sock
            if self._closed:
                sock.close()
                raise _NoContent()
            try:
                sock.sendall(self._request(host_header, target))
                status, reason, headers, rest = read_head(sock)
            except BaseException:
                sock.close()
                raise
            self.status, self.response_headers = status, headers
            if status == 200:
                ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
                if ctype != "text/event-stream":
                    sock.close()
                    raise SSEError(200, f"unexpected Content-Type {ctype or '(none)'!r}")
                sock.settimeout(self.read_timeout)
                return sock, headers, rest
            sock.close()
            if status == 204:
                raise _NoContent()
            if status in (301, 302, 303, 307, 308) and headers.get("location"):
                from urllib.parse import urljoin

                url = urljoin(url, headers["location"])
                continue
            if 500 <= status < 600:
                after = headers.get("retry-after", "")
                raise _Retryable(f"HTTP {status} {reason}",
                                 int(after) * 1000 if after.isdigit() else None)
            raise SSEError(status, reason or "unexpected status")
        raise SSEError(0, "too many redirects")

    def _body(self, sock: Any, headers: dict[str, str], rest: bytes) -> Iterator[bytes]:
        """Yield decoded body bytes until the response ends."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            decoder = ChunkedDecoder()
            data = rest
            while True:
                if data:
                    payload = decoder.feed(data)
                    if payload:
                        yield payload
                    if decoder.done:
                        return
                data = sock.recv(65536)
                if not data:
                    return
        length_field = headers.get("content-length", "")
        remaining = int(length_field) if length_field.isdigit() else -1
        data = rest
        while True:
            if data:
                if remaining >= 0:
                    data = data[:remaining]
                    remaining -= len(data)
                yield data
            if remaining == 0:
                return
            data = sock.recv(65536)
            if not data:
                return

    # -- iteration -------------------------------------------------------

    def _delay_ms(self, failures: int, hint_ms: int | None) -> int:
        delay = hint_ms if hint_ms is not None else self.retry_ms
        if failures > 1:
            delay *= 2 ** min(failures - 1, 6)
        return max(0, min(delay, self.max_retry_ms))

    def events(self) -> Iterator[ParsedEvent]:
        """Yield events as they arrive, across reconnects (same as iterating)."""
        failures = 0
        while not self._closed:
            error: BaseException | None = None
            hint_ms: int | None = None
            try:
                sock, headers, rest = self._connect()
            except _NoContent:
                self._closed = True
                return
            except _Retryable as exc:
                error, hint_ms = exc, exc.retry_after_ms
            except (OSError, HTTPError) as exc:
                error = exc
            else:
                failures = 0
                self.connects += 1
                if self.on_open is not None:
                    self.on_open(self)
                parser = EventStreamParser(max_line=self.max_line)
                parser.last_event_id = self.last_event_id
                try:
                    for chunk in self._body(sock, headers, rest):
                        self.bytes_received += len(chunk)
                        try:
                            batch = parser.feed(chunk)
                        except ValueError as exc:
                            raise SSEError(0, str(exc)) from None
                        if parser.comments:
                            parser.comments.clear()  # heartbeats must not pile up
                        if parser.retry is not None:
                            self.retry_ms = parser.retry
                        for event in batch:
                            self.last_event_id = event.last_event_id
                            self.events_received += 1
                            if self.on_event is not None:
                                self.on_event(self, event)
                            yield event
                            if self._closed:
                                return
                    # The id of a frame still without a blank line counts too.
                    self.last_event_id = parser.last_event_id
                except (OSError, HTTPError) as exc:
                    error = exc
                finally:
                    self._sock = None
                    sock.close()
            if self._closed:
                return
            if error is not None:
                failures += 1
                log.debug("event stream %s failed: %s", self.url, error)
                if self.on_error is not None:
                    self.on_error(self, error)
            if not self.reconnect or (self.max_reconnects is not None
                                      and self.reconnects >= self.max_reconnects):
                self._closed = True
                if error is not None and not isinstance(error, _Retryable):
                    raise error
                if isinstance(error, _Retryable):
                    raise SSEError(self.status or 0, str(error))
                return
            delay = self._delay_ms(failures, hint_ms)
            if self._wake.wait(delay / 1000.0):
                return  # closed while waiting
            self.reconnects += 1

