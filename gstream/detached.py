"""Streaming responses served by loop callbacks after their request greenlet ended.

Under gstream's :class:`~gstream.server.Server`, :class:`~gstream.handler.GStreamHandler`
hands the connection of a streaming body that asks for it (an SSE subscriber of
:class:`~gstream.broker.SSEBroker`) to a :class:`DetachedStream` once the response head is
out: an idle stream then holds no greenlet, only this object, its socket and one read
watcher. Why and how: docs/server.md ("Detached streams").
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

import gevent

__all__ = ["DetachedStream", "StreamSource", "detached_streams"]

log = logging.getLogger("gstream.detached")
# Departures are logged where every other server kind logs them (gstream.departure).
departure_log = logging.getLogger("gstream.departure")

#: Bytes a client may send on a detached stream (it has nothing to say) before
#: the stream is closed; what it sends is read and dropped so its FIN is seen.
MAX_DISCARD = 65536
_READ = 1  # EV_READ
_WRITE = 2  # EV_WRITE
_LAST_CHUNK = b"0\r\n\r\n"

# Streams alive without their request greenlet. The broker holds its own
# subscribers too; this set makes the count public and keeps a stream whose
# source forgot it alive until it closes.
_open: set[DetachedStream] = set()


# The last chunk framed, by identity: a broker hands the very same bytes object
# to every stream that shares a batch (docs/broker.md, "One join per batch"),
# so the framing is done once for all of them too. Holding the data keeps its
# id from being reused.
_last_chunk: tuple[bytes, bytes] = (b"", b"")


def _chunk(data: bytes) -> bytes:
    """``data`` as one HTTP chunk (shared with the previous caller's if the same object)."""
    global _last_chunk
    seen, framed = _last_chunk
    if seen is data:
        return framed
    framed = b"".join((b"%x\r\n" % len(data), data, b"\r\n"))
    _last_chunk = (data, framed)
    return framed


def detached_streams() -> int:
    """How many streaming responses currently live without their request greenlet."""
    return len(_open)


class StreamSource(Protocol):
    """What feeds a :class:`DetachedStream` (a broker subscriber)."""

    def pull(self) -> tuple[bytes, bool]:
        """Everything due now (``b""``: nothing), and whether the stream ends after it."""

    def stream_ready(self, stream: DetachedStream | None) -> None:
        """``stream`` can take bytes now (call its :meth:`~DetachedStream.switch` to send);
        None while a write waits for the client to read."""

    def stream_closed(self) -> None:
        """The stream is over: ended, or its client left, or it was aborted."""


class DetachedStream:
    """One streaming response written by loop callbacks with non-blocking sends.

    What :meth:`switch` pulls from the source leaves in one ``send`` (HTTP chunk framing
    added when the response is chunked). A send the kernel takes only in part leaves the
    rest *pending*: a write watcher finishes it, and meanwhile the source is told the
    stream is busy (its own bounded queue and slow-subscriber policy apply, as when a
    greenlet blocks in a write). A read watcher notices the client's FIN or RST at once.

    Args:
        sock: a non-blocking OS socket (the connection's descriptor, moved out of the server's).
        release: gives back the connection's seat under the server's cap (called once).
        chunked: whether the response uses chunked transfer encoding.
    """

    __slots__ = ("sock", "release", "chunked", "source", "pending", "reader", "writer",
                 "ending", "discarded", "__weakref__")

    def __init__(self, sock: Any, release: Callable[[], None], chunked: bool) -> None:
        self.sock: Any = sock
        self.release: Callable[[], None] | None = release
        self.chunked = chunked
        self.source: StreamSource | None = None
        self.pending = b""
        self.reader: Any = None
        self.writer: Any = None
        self.ending = False
        self.discarded = 0

    @property
    def closed(self) -> bool:
        """True once the connection is closed."""
        return self.sock is None

    def start(self, source: StreamSource) -> None:
        """Serve ``source`` from now on (its first bytes are pulled by the first :meth:`switch`)."""
        self.source = source
        _open.add(self)
        reader = self.reader = gevent.get_hub().loop.io(self.sock.fileno(), _READ)
        reader.start(self._on_readable)
        source.stream_ready(self)

    def switch(self, _value: Any = None) -> None:
        """Send what the source has now (a no-op while a write is pending).

        Named like ``Waiter.switch``: a broker wakes a parked greenlet and a
        detached stream with the same call.
        """
        source = self.source
        if source is None or self.pending or self.sock is None:
            return
        data, last = source.pull()
        if last:
            self.ending = True
        if data:
            if self.chunked:
                data = _chunk(data) if not last else b"".join(
                    (b"%x\r\n" % len(data), data, b"\r\n0\r\n\r\n"))
            self._send(data)
        elif last and self.chunked:
            self._send(_LAST_CHUNK)
        if self.ending and not self.pending:
            self._close(None)

    def abort(self, reason: str = "aborted") -> None:
        """Close the connection now (pending bytes are lost)."""
        self._close(reason)

    def _send(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._close(f"write failed: {exc}")
            return
        if sent < len(data):
            self.pending = data[sent:]
            source = self.source
            if source is not None:
                source.stream_ready(None)
            if self.writer is None:
                self.writer = gevent.get_hub().loop.io(self.sock.fileno(), _WRITE)
            self.writer.start(self._on_writable)

    def _on_writable(self) -> None:
        if self.sock is None:
            return
        data, self.pending = self.pending, b""
        self._send(data)
        if self.pending or self.sock is None:
            return
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()  # made again on need: most streams never block
        if self.ending:
            self._close(None)
            return
        source = self.source
        if source is not None:
            source.stream_ready(self)
            self.switch()  # what queued up meanwhile

    def _on_readable(self) -> None:
        # The client has nothing to say on a stream: read (and drop) what it
        # sends, so that its FIN or RST is seen at once, as a departure.
        sock = self.sock
        if sock is None:
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            departure_log.debug("client of detached stream %s reset the connection (%s)",
                                sock.fileno(), exc.strerror or exc)
            self._close("client reset the connection")
            return
        if not data:
            departure_log.debug("client of detached stream %s closed the connection",
                                sock.fileno())
            self._close("client closed the connection")
            return
        self.discarded += len(data)
        if self.discarded > MAX_DISCARD:
            log.info("stream client sent %d bytes on an event stream; closing", self.discarded)
            self._close("client sent data")

    def _close(self, reason: str | None) -> None:
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        if reason:
            log.debug("detached stream %s: %s", sock.fileno(), reason)
        for watcher in (self.reader, self.writer):
            if watcher is not None:
                watcher.close()  # before the descriptor goes
        self.reader = self.writer = None
        self.pending = b""
        try:
            if reason is None:  # ended: let the client read to the end, then see our FIN
                sock.shutdown(socket.SHUT_WR)
            sock.close()
        except OSError:
            pass
        release, self.release = self.release, None
        if release is not None:
            release()
        _open.discard(self)
        source, self.source = self.source, None
        if source is not None:
            source.stream_closed()
