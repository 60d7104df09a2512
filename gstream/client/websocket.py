"""A gevent-native WebSocket client over the ``websockets`` Sans-I/O protocol.

``websockets``' ``ClientProtocol`` does RFC 6455; this module owns the socket, one
reader greenlet per connection and a per-connection write lock (docs/server.md,
"gstream.client.connect"). Example::

    with connect("ws://127.0.0.1:8000/chat") as ws:
        ws.send("hello")
        print(ws.recv(timeout=5))
"""

from __future__ import annotations

import codecs
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gevent
import gevent.event
import gevent.queue
from gevent import socket as gsocket
from gevent.lock import Semaphore

from ..errors import Closed, HandshakeError
from ._http import open_socket

__all__ = ["WebSocketClient", "connect"]

# Close codes that end iteration quietly instead of raising.
_NORMAL_CLOSE = (1000, 1001, 1005)
_CLOSED = object()
_ping_ids = itertools.count(1)


class WebSocketClient:
    """An open WebSocket connection; create it with :func:`connect`.

    ``recv()`` and iteration may run in one greenlet while others ``send()``.
    After the connection closes, buffered messages can still be received;
    then ``recv()`` raises :class:`gstream.Closed` (with ``code``) and
    iteration ends (quietly for 1000/1001, with ``Closed`` otherwise).
    """

    def __init__(self, sock: Any, protocol: Any, response: Any, *, pending: Sequence[Any] = (),
                 max_size: int | None = 1 << 20, max_queue: int = 64,
                 close_timeout: float = 5.0) -> None:
        self._sock = sock
        self._protocol = protocol
        self.response_status: int = response.status_code
        """Status of the handshake response (101)."""
        self.response_headers: dict[str, str] = {k.lower(): v for k, v in response.headers.raw_items()}
        """Handshake response headers, lower-cased names."""
        self.subprotocol: str | None = protocol.subprotocol
        """The subprotocol the server selected, if any."""
        self.max_size = max_size
        self.max_queue = max(1, max_queue)
        self.close_timeout = close_timeout
        self.messages_sent = 0
        self.messages_received = 0
        self.bytes_sent = 0
        """Bytes written to the socket (frames, including headers)."""
        self.bytes_received = 0
        """Bytes read from the socket."""
        self._lock = Semaphore()
        self._messages: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self._space = gevent.event.Event()
        self._space.set()
        self._closing = False
        self._done = gevent.event.Event()
        self._pings: dict[bytes, tuple[gevent.event.AsyncResult, float]] = {}
        self._parts: list[bytes] = []
        self._part_text = False
        self._part_size = 0
        self._handle_events(pending, block=False)
        # Frames that came with the handshake response may need an answer
        # (a pong, the close echo) before the reader's first recv().
        with self._lock:
            try:
                self._flush_locked()
            except OSError:
                pass
        self._reader = gevent.spawn(self._read_loop)

    # -- state -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the TCP connection is closed."""
        return self._done.is_set()

    @property
    def close_code(self) -> int | None:
        """The close code received from the server (1006 when none was), or None while open."""
        if not self._done.is_set():
            return None
        return self._protocol.close_code

    @property
    def close_reason(self) -> str | None:
        """The close reason received from the server, or None while open."""
        if not self._done.is_set():
            return None
        return self._protocol.close_reason

    @property
    def sent_close_code(self) -> int | None:
        """The code of the close frame this client sent, or None if it sent none.

        Tells a close the client started itself (1009 for a message too big,
        1007 for bad UTF-8) from one the server started.
        """
        sent = getattr(self._protocol, "close_sent", None)
        return None if sent is None else sent.code

    def _closed_error(self) -> Closed:
        code = self._protocol.close_code
        return Closed(self._protocol.close_reason or "connection closed", code)

    # -- writing ---------------------------------------------------------

    def _flush_locked(self) -> None:
        for data in self._protocol.data_to_send():
            if data:
                self._sock.sendall(data)
                self.bytes_sent += len(data)
            else:  # the protocol's end-of-stream marker: half-close
                try:
                    self._sock.shutdown(gsocket.SHUT_WR)
                except OSError:
                    pass

    def _write(self, op: str, *args: Any) -> None:
        with self._lock:
            try:
                getattr(self._protocol, op)(*args)
            except Exception as exc:  # InvalidState: not open any more
                raise self._closed_error() from exc
            try:
                self._flush_locked()
            except OSError as exc:
                raise Closed(f"connection lost: {exc}", 1006) from exc

    def send(self, message: str | bytes | bytearray | memoryview) -> None:
        """Send a text (``str``) or binary (bytes-like) message.

        Raises :class:`gstream.Closed` when the connection is closing or closed.
        """
        if isinstance(message, str):
            self._write("send_text", message.encode("utf-8"))
        elif isinstance(message, (bytes, bytearray, memoryview)):
            self._write("send_binary", bytes(message))
        else:
            raise TypeError("send() takes str or bytes")
        self.messages_sent += 1

    def ping(self, data: bytes | None = None) -> gevent.event.AsyncResult:
        """Send a ping; return an ``AsyncResult`` resolving to the round trip in seconds.

        ``ping().get(timeout=5)`` waits for the pong; it raises
        :class:`gstream.Closed` if the connection closes first.
        """
        if data is None:
            data = next(_ping_ids).to_bytes(8, "big")
        waiter = gevent.event.AsyncResult()
        self._pings[data] = (waiter, time.monotonic())
        try:
            self._write("send_ping", data)
        except Closed:
            self._pings.pop(data, None)
            raise
        return waiter

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Run the closing handshake; returns when the TCP connection is closed.

        Waits up to ``close_timeout`` for the server's close frame and TCP
        close, then aborts the connection. Idempotent.
        """
        if not self._closing:
            self._closing = True
            self._space.set()  # a reader blocked on a full queue must keep reading
            try:
                self._write("send_close", code, reason)
            except Closed:
                pass
        if not self._done.wait(self.close_timeout):
            self.abort()
            self._done.wait(1.0)

    def abort(self) -> None:
        """Close the TCP connection at once, without a closing handshake."""
        self._closing = True
        self._space.set()
        try:
            self._sock.close()  # wakes the reader greenlet
        except OSError:
            pass

    def __enter__(self) -> WebSocketClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------

    def recv(self, timeout: float | None = None) -> str | bytes:
        """Return the next message (``str`` for text, ``bytes`` for binary).

        Raises :class:`TimeoutError` after ``timeout`` seconds without one,
        and :class:`gstream.Closed` once the connection is closed and every
        buffered message was received.
        """
        try:
            item = self._messages.get(timeout=timeout)
        except gevent.queue.Empty:
            raise TimeoutError(f"no message within {timeout} s") from None
        if item is _CLOSED:
            self._messages.put(_CLOSED)  # every later recv() raises too
            raise self._closed_error()
        self._space.set()
        return item

    def __iter__(self) -> Iterator[str | bytes]:
        while True:
            try:
                yield self.recv()
            except Closed as exc:
                if exc.code in _NORMAL_CLOSE:
                    return
                raise

    def _read_loop(self) -> None:
        sock, protocol = self._sock, self._protocol
        try:
            if protocol.close_expected():
                sock.settimeout(self.close_timeout)
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""  # reset, closed by abort(), or close timeout
                if data:
                    self.bytes_received += len(data)
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                self._handle_events(protocol.events_received())
                with self._lock:
                    try:
                        self._flush_locked()
                    except OSError:
                        data = b""
                if not data:
                    return
                if protocol.close_expected():
                    # The server closes TCP first; don't wait forever for it.
                    sock.settimeout(self.close_timeout)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            error = self._closed_error()
            for waiter, _ in self._pings.values():
                waiter.set_exception(error)
            self._pings.clear()
            self._messages.put(_CLOSED)
            self._done.set()

    def _handle_events(self, events: Sequence[Any], block: bool = True) -> None:
        for frame in events:
            op = int(frame.opcode)
            if op in (1, 2):  # text, binary: a new message
                self._parts = [frame.data]
                self._part_text = op == 1
                self._part_size = len(frame.data)
            elif op == 0:  # continuation
                self._parts.append(frame.data)
                self._part_size += len(frame.data)
            elif op == 10:  # pong: acknowledges this ping and every earlier one
                self._resolve_pings(bytes(frame.data))
                continue
            else:  # ping (answered by the protocol), close (echoed by it)
                continue
            if self.max_size is not None and self._part_size > self.max_size:
                self._parts = []
                self._fail(1009, f"message larger than {self.max_size} bytes")
                return
            if frame.fin:
                payload = b"".join(self._parts)
                self._parts = []
                message: str | bytes = payload
                if self._part_text:
                    try:
                        message = codecs.decode(payload, "utf-8")
                    except UnicodeDecodeError:
                        self._fail(1007, "invalid UTF-8 in a text message")
                        return
                self.messages_received += 1
                self._messages.put(message)
                # Backpressure: stop reading while the application is behind.
                while block and self._messages.qsize() >= self.max_queue and not self._closing:
                    self._space.clear()
                    self._space.wait()

    def _resolve_pings(self, data: bytes) -> None:
        if data not in self._pings:
            return
        now = time.monotonic()
        for key in list(self._pings):
            waiter, sent = self._pings.pop(key)
            waiter.set(now - sent)
            if key == data:
                break

    def _fail(self, code: int, reason: str) -> None:
        try:
            self._protocol.fail(code, reason)
        except Exception:  # already closing
            pass


def connect(
    url: str,
    *,
    subprotocols: Sequence[str] | None = None,
    origin: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_size: int | None = 1 << 20,
    max_queue: int = 64,
    open_timeout: float | None = 10.0,
    close_timeout: float = 5.0,
    compression: str | None = None,
    ssl_context: Any = None,
) -> WebSocketClient:
    """Open a WebSocket connection to ``url`` (``ws://`` or ``wss://``).

    Args:
        subprotocols: subprotocols to offer, in order of preference.
        origin: the ``Origin`` header to send.
        headers: extra handshake request headers.
        max_size: the largest message accepted; bigger ones close with 1009.
        max_queue: received messages buffered before the reader stops
            reading (TCP backpressure then reaches the server).
        open_timeout: seconds allowed for TCP connect, TLS and handshake.
        close_timeout: seconds :meth:`WebSocketClient.close` waits for the server.
        compression: ``"deflate"`` to offer permessage-deflate; ``None`` for none.
        ssl_context: an :class:`ssl.SSLContext` for ``wss`` (default: verify).

    Raises:
        HandshakeError: the server refused the upgrade (``status`` is its HTTP status).
        TimeoutError: the handshake took longer than ``open_timeout``.
        OSError: the connection failed.
    """
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    wsuri = parse_uri(url)
    extensions: Any = None
    if compression == "deflate":
        from websockets.extensions.permessage_deflate import enable_client_permessage_deflate

        extensions = enable_client_permessage_deflate(None)
    elif compression is not None:
        raise ValueError(f"unsupported compression {compression!r}")
    timer = gevent.Timeout(open_timeout, TimeoutError(f"WebSocket handshake with {url} timed out"))
    timer.start()
    sock = None
    try:
        sock = open_socket(wsuri.host, wsuri.port, secure=wsuri.secure, timeout=None,
                           ssl_context=ssl_context)
        protocol = ClientProtocol(wsuri, origin=origin, extensions=extensions,  # type: ignore[arg-type]
                                  subprotocols=subprotocols, max_size=max_size)  # type: ignore[arg-type]
        request = protocol.connect()
        for name, value in (headers or {}).items():
            request.headers[name] = value
        protocol.send_request(request)
        for data in protocol.data_to_send():
            sock.sendall(data)
        events: list[Any] = []
        while not events:
            data = sock.recv(65536)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            events = protocol.events_received()
            if not data and not events:
                raise ConnectionError("connection closed during the WebSocket handshake")
        response = events[0]
        if protocol.handshake_exc is not None:
            status = getattr(response, "status_code", 0) or 0
            raise HandshakeError(status, str(protocol.handshake_exc))
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    finally:
        timer.close()
    return WebSocketClient(sock, protocol, response, pending=events[1:], max_size=max_size,
                           max_queue=max_queue, close_timeout=close_timeout)
