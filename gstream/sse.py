"""Server-Sent Events and chunked streaming for WSGI applications.

Two shapes, because WSGI apps come in two: :class:`SSEWriter` pushes events
through ``start_response``'s ``write``; :func:`stream_events` returns an iterable
body for frameworks (Flask, Django). Both encode with :func:`gstream.events.encode`
(docs/design.md, "WSGI shapes").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl

from gevent.lock import Semaphore

from .errors import Closed
from .events import Event, EventType, encode, encode_comment, encode_retry, truncate_field
from .types import Environ, StartResponse

__all__ = [
    "SSE_HEADERS",
    "SSEWriter",
    "ChunkedWriter",
    "last_event_id",
    "query_param",
    "stream_events",
]

#: Response headers for an event stream. ``X-Accel-Buffering: no`` stops
#: nginx from buffering the stream; ``Cache-Control: no-cache`` stops caches.
SSE_HEADERS: list[tuple[str, str]] = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
]

#: Longest ``Last-Event-ID`` kept; longer values are cut (never an error).
MAX_LAST_EVENT_ID = 1024


def query_param(environ: Environ, name: str) -> str | None:
    """Return the first value of query parameter ``name``, or ``None``."""
    qs = environ.get("QUERY_STRING") or ""
    if name not in qs:
        return None
    for key, value in parse_qsl(qs, keep_blank_values=True):
        if key == name:
            return value
    return None


def last_event_id(environ: Environ, max_length: int = MAX_LAST_EVENT_ID) -> str:
    """Return the client's last event id, or ``""``.

    The ``Last-Event-ID`` header wins; when it is absent or empty the
    ``last_event_id`` query parameter is used (for clients that cannot set
    headers). The value is cut at the first CR, LF or NUL, and to
    ``max_length`` characters, so it can be echoed safely.
    """
    raw = environ.get("HTTP_LAST_EVENT_ID")
    if not raw:
        raw = query_param(environ, "last_event_id") or ""
    elif isinstance(raw, str):
        # WSGI header values are latin-1-decoded bytes; recover the UTF-8.
        try:
            raw = raw.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return truncate_field(raw)[:max_length]


class SSEWriter:
    """Write Server-Sent Events to a WSGI response, one flushed frame per call.

    Headers are sent lazily with the first frame (or by :meth:`open`). Every
    write is serialized by a lock, so several greenlets may share a writer.
    Once the client is gone, or after :meth:`close`, every write raises
    :class:`~gstream.errors.Closed`.

    Example (raw WSGI under ``gevent.pywsgi``)::

        def app(environ, start_response):
            sse = SSEWriter(environ, start_response)
            sse.write_event("greeting", "hello")
            return sse.close()
    """

    def __init__(
        self,
        environ: Environ,
        start_response: StartResponse,
        *,
        headers: Iterable[tuple[str, str]] = (),
        status: str = "200 OK",
    ) -> None:
        self.environ = environ
        self._start_response = start_response
        self._headers = list(SSE_HEADERS) + list(headers)
        self._status = status
        self._write: Callable[[bytes], Any] | None = None
        self._lock = Semaphore()
        self._pending_id: str | None = None
        self._pending_retry = b""
        self._closed = False
        self.bytes_written = 0
        """Bytes written to the response body so far."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or a write failed."""
        return self._closed

    @property
    def last_event_id(self) -> str:
        """The id the client resumes from (see :func:`last_event_id`)."""
        return last_event_id(self.environ)

    def open(self) -> None:
        """Send the status line and headers now, before any event."""
        with self._lock:
            self._send(b"")

    def _send(self, frame: bytes) -> None:
        if self._closed:
            raise Closed("event stream is closed")
        try:
            if self._write is None:
                self._write = self._start_response(self._status, self._headers)
            self._write(frame)
        except OSError as exc:
            self._closed = True
            raise Closed(f"client went away: {exc}") from exc
        self.bytes_written += len(frame)

    def send(self, event: Event) -> None:
        """Write ``event`` (with any id or retry queued by set_id/set_retry)."""
        with self._lock:
            if self._pending_id is not None and event.id is None:
                event = Event(
                    data=event.data, type=event.type, name=event.name,
                    id=self._pending_id, retry=event.retry,
                )
            self._pending_id = None
            retry, self._pending_retry = self._pending_retry, b""
            frame = encode(event)
            if retry:
                # A queued retry line joins this frame (it is one event).
                frame = retry + frame
            self._send(frame)

    def send_raw(self, frame: bytes) -> None:
        """Write already-encoded frame bytes (e.g. shared by a broker)."""
        with self._lock:
            self._send(frame)

    def write_event(self, name: str, data: str) -> None:
        """Write a named event (``event: name``); an empty name means message."""
        self.send(Event(data=data, type=EventType.CUSTOM, name=name))

    def write_data(self, data: str) -> None:
        """Write an anonymous event: data lines only, dispatched as ``message``."""
        self.send(Event(data=data))

    def write_message(self, data: str) -> None:
        """Write an explicit ``event: message`` event."""
        self.write_event("message", data)

    def write_error(self, message: str) -> None:
        """Write an ``event: error`` event."""
        self.send(Event(data=message, type=EventType.ERROR))

    def write_done(self, data: str = "[DONE]") -> None:
        """Write an ``event: done`` event (data ``[DONE]`` by default)."""
        self.send(Event(data=data, type=EventType.DONE))

    def write_comment(self, text: str) -> None:
        """Write a comment frame, cut at the first CR/LF/NUL."""
        with self._lock:
            self._send(encode_comment(text))

    def set_id(self, event_id: str) -> None:
        """Attach ``event_id`` to the next event written (once)."""
        self._pending_id = event_id

    def set_retry(self, milliseconds: int) -> None:
        """Ask the client to wait ``milliseconds`` before reconnecting.

        Sent as its own flushed frame. Zero or negative values are dropped:
        ``retry: 0`` causes reconnect storms.
        """
        frame = encode_retry(milliseconds)
        if frame:
            with self._lock:
                self._send(frame)

    def close(self) -> list[bytes]:
        """Close the stream (idempotent) and return an empty WSGI body.

        Headers are committed first if nothing was written yet, so the
        client sees a valid, empty event stream.
        """
        with self._lock:
            if not self._closed and self._write is None:
                try:
                    self._send(b"")
                except Closed:
                    pass
            self._closed = True
        return []


def stream_events(
    source: Iterable[Event | str | bytes],
    *,
    open_comment: bool = True,
) -> Iterator[bytes]:
    """Turn an iterable of events into an event-stream response body.

    ``Event`` items are encoded, ``str`` items become plain ``data`` events,
    ``bytes`` are passed through as pre-encoded frames. A first comment is
    yielded at once (``open_comment``) so the status line and headers reach
    the client (and any proxy) before the first event. When the client goes
    away the server stops iterating and ``close()`` on this generator closes
    ``source`` too, so application generators never run on after a
    disconnect.

    Use with :data:`SSE_HEADERS`, e.g. in Flask::

        return Response(stream_events(gen()), headers=dict(SSE_HEADERS))
    """
    iterator = iter(source)
    try:
        if open_comment:
            yield b": stream open\n\n"
        for item in iterator:
            if isinstance(item, Event):
                yield encode(item)
            elif isinstance(item, str):
                yield encode(Event(data=item))
            else:
                yield bytes(item)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


class ChunkedWriter:
    """Stream raw chunks to a WSGI response; each chunk is sent at once.

    The server supplies the HTTP chunk framing (gevent's pywsgi and gunicorn
    use ``Transfer-Encoding: chunked`` when no length is set). After
    :meth:`close`, or once the client is gone, writes raise
    :class:`~gstream.errors.Closed`.
    """

    def __init__(
        self,
        environ: Environ,
        start_response: StartResponse,
        *,
        content_type: str = "application/octet-stream",
        headers: Iterable[tuple[str, str]] = (),
        status: str = "200 OK",
    ) -> None:
        self.environ = environ
        self._start_response = start_response
        self._headers = [("Content-Type", content_type), ("X-Accel-Buffering", "no"), *headers]
        self._status = status
        self._write: Callable[[bytes], Any] | None = None
        self._lock = Semaphore()
        self._closed = False
        self.bytes_written = 0
        """Bytes written so far."""

    @property
    def closed(self) -> bool:
        """True once closed or after a failed write."""
        return self._closed

    def write_chunk(self, chunk: bytes) -> None:
        """Send ``chunk`` now. An empty chunk sends nothing (but commits headers)."""
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError("write_chunk() takes bytes")
        with self._lock:
            if self._closed:
                raise Closed("chunked stream is closed")
            try:
                if self._write is None:
                    self._write = self._start_response(self._status, self._headers)
                self._write(bytes(chunk))
            except OSError as exc:
                self._closed = True
                raise Closed(f"client went away: {exc}") from exc
            self.bytes_written += len(chunk)

    def close(self) -> list[bytes]:
        """Close the stream; idempotent. Returns an empty WSGI body."""
        with self._lock:
            if not self._closed and self._write is None:
                try:
                    self._write = self._start_response(self._status, self._headers)
                    self._write(b"")
                except OSError:
                    pass
            self._closed = True
        return []
