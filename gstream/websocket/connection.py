"""The WebSocket connection: gevent I/O around websockets' Sans-I/O protocol.

No greenlet of its own: a libev read watcher feeds the protocol from the hub, keepalive is a
shared sweep, writes go through the outbox (outbox.py). Why: docs/websocket.md, "I/O model".
"""

from __future__ import annotations

import logging
import socket
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
from gevent.hub import Waiter
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import CLOSED, OPEN

from ..errors import Closed
from ..hijack import Hijack
from ..lifecycle import Lifecycle, lifecycle_for
from ..tlsio import TLSTransport, is_tls, os_socket
from .assembler import Assembler, MessageError, whole_message
from .callbacks import CallbackSession, _discard
from .config import WSConfig
from .frames import PING, Message, PreparedMessage, encode_frame, prepare
from .keepalive import KeepaliveSweep, join_sweep
from .outbox import OutboundQueue, flusher_for
from .protocol import GStreamProtocol

__all__ = ["WebSocket", "PreparedMessage", "prepare", "close_all", "open_connections"]

log = logging.getLogger("gstream.websocket")

_RECV_SIZE = 65536
# A client's pong of a 4-byte nonce: FIN + opcode 0xA, masked, length 4.
_PONG_HEAD = b"\x8a\x84"

# Bound once: these are looked up for every frame and every message.
_monotonic = time.monotonic
_OP_TEXT, _OP_BINARY, _OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_OP_PING, _OP_PONG, _OP_CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE

_open: weakref.WeakSet[WebSocket] = weakref.WeakSet()


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999)


def open_connections() -> list[WebSocket]:
    """WebSocket connections of this process that are not fully closed yet."""
    return list(_open)


def close_all(timeout: float | None = None, code: int = 1001,
              reason: str = "server shutting down") -> int:
    """Close every open connection with ``code`` (1001 going away) and wait.

    Waits up to ``timeout`` (default: the largest close timeout plus 0.5 s)
    for the closing handshakes; connections still open then are aborted.
    Returns how many had to be aborted.
    """
    conns = list(_open)
    for ws in conns:
        ws.shutdown(reason, code=code)
    if timeout is None:
        timeout = max((ws.config.close_timeout for ws in conns), default=0) + 0.5
    deadline = time.monotonic() + timeout
    late = [ws for ws in conns if not ws.wait_closed(max(0.0, deadline - time.monotonic()))]
    for ws in late:
        ws.abort("close timeout")
    return len(late)


class WebSocket(OutboundQueue, CallbackSession):
    """One server-side WebSocket connection (made by :func:`gstream.upgrade`).

    Attributes:
        environ: the WSGI environ of the upgrade request.
        subprotocol: the negotiated subprotocol, or None.
        close_code, close_reason: why it closed: the peer's code if it sent a
            close frame, else ours, else 1006 (no close frame). None while open.
        dropped_inbound: messages dropped by the ``"drop"`` inbound policy.
        latency: round-trip time of the last answered keepalive ping (s).
    """

    __slots__ = (
        "__weakref__", "environ", "config", "subprotocol", "_closed", "close_code",
        "close_reason", "dropped_inbound", "latency", "_p", "_hijack", "_sock", "_raw",
        "_fd", "_tls", "_loop", "_hub", "_flusher", "_inbound", "_waiter", "_recv_done", "_paused", "_failed",
        "_frag", "_out", "_out_bytes",
        "_out_msgs", "_eof_pending", "_eof_sent", "_flush_scheduled", "_writer", "_space",
        "_reader", "_reading", "_keepalive", "_close_timer", "_last_rx", "_ping_nonce",
        "_ping_sent_at", "_ping_count", "_finalized", "_callbacks", "_peer_eof",
        "_on_message", "_dispatcher", "_release", "_pause_budget", "_in_loop", "_lifecycle",
    )

    def __init__(self, protocol: GStreamProtocol, hijack: Hijack, config: WSConfig,
                 environ: dict[str, Any]) -> None:
        self.environ = environ
        self.config = config
        self.subprotocol: str | None = protocol.subprotocol
        self._closed = gevent.event.Event()  # set once fully closed (wait_closed)
        self.close_code: int | None = None
        self.close_reason = ""
        self.dropped_inbound = 0
        self.latency: float | None = None
        self._p = protocol
        self._hijack = hijack
        self._sock = hijack.sock
        # What we read and write: the non-blocking OS socket, or over TLS the
        # TLS layer (made non-blocking in _start, after the handshake's 101).
        self._tls = is_tls(hijack.sock)
        self._raw: Any = os_socket(hijack.sock)
        self._fd = hijack.sock.fileno()
        self._hub = gevent.get_hub()
        self._loop = self._hub.loop
        # Lists, not deques: an idle deque keeps a 64-slot block for the life
        # of the connection, an empty list a bare header. Both
        # queues are short (max_queue, send_buffer) and drained from the
        # front in one slice (see _consume).
        self._inbound: list[Message] = []
        # The greenlet parked in receive(), woken straight from the read
        # callback (a Waiter, not an Event: no extra loop callback per message).
        self._waiter: Waiter[Any] | None = None
        self._flusher = flusher_for(self._hub)
        self._recv_done = False
        self._paused = False
        # Bytes that may still be read while paused, to find the pong of a
        # keepalive ping (reset when the pause starts).
        self._pause_budget = 0
        self._failed = False
        self._frag: Assembler | None = None  # the fragmented message under way
        self._out: list[bytes] = []  # frames; control frames as outbox._Control
        self._out_bytes = 0
        self._out_msgs = 0
        self._eof_pending = False
        self._eof_sent = False
        self._flush_scheduled = False
        self._writer: gevent.Greenlet | None = None
        self._space: gevent.event.Event | None = None  # made when a sender must wait
        self._reader: Any = None
        self._reading = False
        self._keepalive: KeepaliveSweep | None = None
        self._close_timer: Any = None
        self._last_rx = time.monotonic()
        self._ping_nonce: bytes | None = None
        self._ping_sent_at = 0.0
        self._ping_count = 0
        self._finalized = False
        self._peer_eof = False
        self._callbacks: list[Callable[[WebSocket], None]] = (
            [config.on_close] if config.on_close is not None else [])
        self._on_message: Callable[[WebSocket, Message], Any] | None = None
        self._dispatcher: gevent.Greenlet | None = None
        self._in_loop = False  # on_message may be called from the read callback
        # The registry a graceful stop reaches it through: its server's (lifecycle_for).
        self._lifecycle: Lifecycle = lifecycle_for(environ)
        self._release: Callable[[], None] | None = None

    # ------------------------------------------------------------------ start
    def _start(self, pre_read: bytes) -> None:
        if self._tls:
            self._raw = TLSTransport(self._sock)
        self._lifecycle.register(self)
        _open.add(self)
        self._reader = self._loop.io(self._fd, 1)
        self._resume_reading()
        idle = self.config.read_idle_timeout
        if idle is not None:
            self._keepalive = join_sweep(self._hub, self, idle, self.config.pong_timeout)
        if pre_read:
            self._guard(self._feed, pre_read)

    # --------------------------------------------------------------- public API
    @property
    def shares_frames(self) -> bool:
        """True when :meth:`send_prepared` queues the shared frame bytes as is
        (no extension such as permessage-deflate was negotiated)."""
        return not self._p.extensions

    @property
    def send_queue_depth(self) -> int:
        """Messages queued but not yet handed to the kernel."""
        return self._out_msgs

    @property
    def open(self) -> bool:
        """True until a close frame was sent or received or the TCP link is gone."""
        return not self._finalized and self._p.state is OPEN

    @property
    def closed(self) -> bool:
        """True once the connection is closing or closed: ``not ws.open``.

        A bool, as ``closed`` is in aiohttp and websockets, so that
        ``while not ws.closed: ws.send(...)`` loops until the peer goes away.
        To wait for the end of the closing handshake, use :meth:`wait_closed`.
        """
        return self._finalized or self._p.state is not OPEN

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection is fully closed (closing handshake done or
        given up, TCP shut down); False if ``timeout`` seconds passed first."""
        return self._closed.wait(timeout)

    def receive(self, timeout: float | None = None) -> Message:
        """Return the next message: ``str`` for text, ``bytes`` for binary.

        Blocks cooperatively. Messages that arrived before the connection
        closed are returned first; then :class:`gstream.Closed` is raised with
        the close code and reason. Raises :class:`TimeoutError` after
        ``timeout`` seconds without a message.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._inbound:
                return self._pop_inbound()
            if self._recv_done:
                raise Closed(self.close_reason or "connection closed", self.close_code)
            if self._waiter is not None:
                raise RuntimeError("another greenlet is already waiting in receive()")
            waiter: Waiter[Any] = Waiter()
            self._waiter = waiter
            try:
                if deadline is None:
                    waiter.get()
                    continue
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    with gevent.Timeout(remaining, False):
                        waiter.get()
            finally:
                if self._waiter is waiter:
                    self._waiter = None
            if not self._inbound and not self._recv_done:
                raise TimeoutError("no message received in time")

    def _pop_inbound(self) -> Message:
        """The oldest queued message; reading resumes once there is room again."""
        msg = self._inbound.pop(0)
        if self._paused and len(self._inbound) < self.config.max_queue:
            self._paused = False
            self._resume_reading()
        return msg

    def __iter__(self) -> Iterator[Message]:
        """Yield messages until the connection closes (ends quietly)."""
        while True:
            try:
                yield self.receive()
            except Closed:
                return

    def ping(self, data: bytes = b"") -> None:
        """Send a ping (the keepalive sends its own automatically)."""
        self._check_open()
        self._p.send_ping(data)
        self._take_output(False)

    def close(self, code: int = 1000, reason: str = "", wait: bool = True) -> None:
        """Start (or finish) the closing handshake and wait for it.

        Queued messages are sent first, then a close frame with ``code`` and
        ``reason``; the peer's close is awaited up to ``close_timeout``, then
        the TCP connection is shut down. If the peer closed first, its code
        has already been echoed and this only waits. Idempotent.
        """
        if not _valid_close_code(code):
            raise ValueError(f"invalid close code {code}")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("close reason longer than 123 bytes")
        if not self._finalized and self._p.state is OPEN:
            self._p.send_close(code, reason)
            self._take_output(False)
            self._check_state()
        if wait and gevent.getcurrent() is not gevent.get_hub():
            bound = self.config.close_timeout + (self.config.write_timeout or 0) + 1.0
            if not self._closed.wait(bound):
                self.abort("close timeout")

    def abort(self, reason: str = "aborted") -> None:
        """Drop the connection now, without a closing handshake (code 1006)."""
        self._finalize(1006, reason)

    def shutdown(self, reason: str = "server shutting down", code: int = 1001) -> None:
        """Lifecycle hook: start a 1001 close without waiting (never blocks)."""
        if self._finalized:
            return
        if self._p.state is OPEN:
            self._p.send_close(code, reason[:100])
            self._take_output(False)
        self._check_state()

    def on_close(self, callback: Callable[[WebSocket], None]) -> None:
        """Call ``callback(ws)`` once the connection is closed (now if it is)."""
        pending = bool(self._callbacks)
        self._callbacks.append(callback)
        if self._finalized and not pending:
            self._run_callbacks()  # already closed: run now (after any still queued)

    def wsgi_result(self) -> list[bytes]:
        """Return this from the WSGI app when the session is over.

        Closes the connection if still open and tells the server the response
        was handled (under gunicorn's gevent worker this raises StopIteration,
        which is how that worker expects to be told).
        """
        if not self._finalized:
            self.close()
        return self._hijack.wsgi_result()

    def __enter__(self) -> WebSocket:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None and not isinstance(exc, Closed):
            self.close(1011, "internal error")
        else:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._finalized else self._p.state.name.lower()
        return f"<WebSocket fd={self._fd} {state} code={self.close_code}>"

    # --------------------------------------------------------------- reading
    def _resume_reading(self) -> None:
        # Not while a failure is held (see _feed): websockets' parser must
        # not be fed again until the failure is released.
        if (self._reader is not None and not self._reading and not self._finalized
                and self._p.held_failure is None):
            self._reading = True
            self._reader.start(self._on_readable)

    def _stop_reading(self) -> None:
        if self._reader is not None and self._reading:
            self._reading = False
            self._reader.stop()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        # Everything here may run in the hub: an exception must end this
        # connection, not reach the hub's error handler.
        try:
            fn(*args)
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        log.exception("websocket %s: internal error", self._fd)
        self._finalize(1011, "internal error")

    def _on_readable(self) -> None:
        # The read watcher's callback, once per readable event: guarded
        # inline rather than through _guard (one call less per read).
        try:
            try:
                data = self._raw.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if len(data) == 10 and data[:2] == _PONG_HEAD and self._took_pong(data):
                return
            if self._paused:
                self._read_paused(data)
            else:
                self._feed(data)
        except Exception:
            self._internal_error()

    def _took_pong(self, data: bytes) -> bool:
        """Take the pong of our keepalive ping without websockets' parser.

        An idle connection's only traffic is the keepalive: our ping, the
        peer's pong, a 10-byte read of one masked frame. Through the parser's
        generator chain that read cost about half as much as the ping's
        ``send`` (docs/performance.md, seventh round). Only when nothing is
        buffered in the parser (the read starts at a frame boundary), the
        connection is open and not paused, and the payload is the nonce we
        wait for; anything else goes the normal way.
        """
        nonce = self._ping_nonce
        if (nonce is None or self._paused or self._p.reader.buffer
                or self._p.state is not OPEN):
            return False
        mask = int.from_bytes(data[2:6], "big")
        if int.from_bytes(data[6:10], "big") ^ mask != int.from_bytes(nonce, "big"):
            return False
        self._last_rx = now = _monotonic()
        self.latency = now - self._ping_sent_at
        self._ping_nonce = None  # the next ping: one idle period after this pong
        return True

    def _read_paused(self, data: bytes) -> None:
        # Paused (inbound queue full) yet reading: only while a keepalive
        # ping waits for its pong or a Close waits for the peer's, which the
        # peer sent behind its unread messages, and only up to a budget of
        # bytes (docs/websocket.md). What is read is queued as usual.
        self._pause_budget -= len(data)
        self._feed(data)
        if self._paused and not self._may_read_paused():
            self._stop_reading()

    def _may_read_paused(self) -> bool:
        return self._pause_budget > 0 and (
            self._ping_nonce is not None or self._p.state is not OPEN)

    def _feed(self, data: bytes) -> None:
        p = self._p
        queued = len(self._inbound)
        # A failure of websockets' parser (or ours, in _on_frame) is held
        # until the frames parsed before it have been handled: see below.
        p.hold_failures = True
        try:
            if data:
                p.receive_data(data)
            else:
                self._peer_eof = True
                self._stop_reading()
                p.receive_eof()
            for frame in p.events_received():
                self._on_frame(frame)  # type: ignore[arg-type]  # only Frames once open
        finally:
            p.hold_failures = False
        if p.held_failure is not None:
            if len(self._inbound) > queued and not self._finalized:
                # Messages that came before the bad frame in this read are
                # queued: the application gets one turn (now, if it waits in
                # receive(); the callback dispatcher is spawned already) to
                # answer them before the Close goes out behind its answers.
                self._stop_reading()
                self._loop.run_callback(self._guard, self._release_failure)
            else:
                p.release_failure()
        self._take_output(False)
        self._check_state()
        if self._waiter is not None and (self._inbound or self._recv_done):
            # A safe point (all state updated): switch to the reader now.
            self._wake_reader(now=True)

    def _release_failure(self) -> None:
        if self._finalized:
            return
        self._p.release_failure()
        self._take_output(False)
        self._check_state()
        if not self._paused and not self._peer_eof:
            self._resume_reading()  # on to the peer's EOF (websockets discards the rest)

    def _wake_reader(self, now: bool = False) -> None:
        # Once per wait (the slot is cleared first). Directly only from the
        # hub at a safe point (end of _feed); otherwise from a loop callback,
        # so the reader sees the connection's final state (close code) and
        # not one half-way through a transition. If the wait timed out
        # meanwhile, the late switch just stores a value nobody reads.
        waiter, self._waiter = self._waiter, None
        if waiter is None:
            return
        if now and gevent.getcurrent() is self._hub:
            waiter.switch(None)
        else:
            self._loop.run_callback(waiter.switch, None)

    def _on_frame(self, frame: Frame) -> None:
        self._last_rx = _monotonic()
        op = frame.opcode
        if (op is _OP_TEXT or op is _OP_BINARY) and frame.fin and not self._failed:
            try:
                msg = whole_message(frame.data, op is _OP_TEXT, self.config.read_limit)
            except MessageError as exc:
                self._fail(exc.code, exc.reason)
                return
            self._deliver(msg)
            return
        if op is _OP_PONG:
            if self._ping_nonce is not None and frame.data == self._ping_nonce:
                self.latency = self._last_rx - self._ping_sent_at
                self._ping_nonce = None  # the next ping: one idle period after this pong
            return
        if op is _OP_PING or op is _OP_CLOSE or self._failed:
            return  # websockets answers pings and echoes closes itself
        if op is not _OP_CONT:
            self._frag = Assembler(op is _OP_TEXT, self.config.read_limit)
        frag = self._frag
        if frag is None:
            return  # a continuation with nothing to continue: websockets fails it
        try:
            done = frag.add(frame.data, frame.fin)
        except MessageError as exc:
            self._frag = None
            self._fail(exc.code, exc.reason)
            return
        if done is not None:
            self._frag = None
            self._deliver(done)

    def _deliver(self, msg: Message) -> None:
        on_message = self._on_message
        if on_message is _discard:
            return
        if (self._in_loop and not self._inbound and not self._out_msgs
                and (self._dispatcher is None or self._waiter is not None)):
            # Nothing queued either way (and the dispatcher, if any, parked
            # idle): call it here, in order, without a greenlet switch.
            self._call_in_loop(msg)
            return
        cfg = self.config
        if len(self._inbound) >= cfg.max_queue:
            if cfg.inbound_overflow == "drop":
                self.dropped_inbound += 1
                return
            if cfg.inbound_overflow == "close":
                self._fail(1008, "inbound queue full")
                return
        self._inbound.append(msg)
        if self._on_message is not None:
            self._kick_dispatch()
        if cfg.inbound_overflow == "pause" and len(self._inbound) >= cfg.max_queue:
            self._pause()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            # What may still be read while paused to find a keepalive pong
            # or the peer's Close: one largest message, or one read.
            self._pause_budget = max(self.config.read_limit, _RECV_SIZE)
        if not self._may_read_paused():
            self._stop_reading()

    def _fail(self, code: int, reason: str) -> None:
        self._failed = True
        p = self._p
        if p.hold_failures and p.state is OPEN:
            # Called from _on_frame while feeding: this frame comes before
            # whatever the parser may have failed on further on.
            p.held_failure = (code, reason)
        else:
            p.fail(code, reason)

    # ---------------------------------------------------- keepalive and close
    def _keepalive_due(self, now: float) -> None:
        """Called by the keepalive sweep: a ping is due, or its pong is late."""
        cfg = self.config
        if self._finalized or self._p.state is not OPEN:
            return
        if self._ping_nonce is not None:
            if now - self._ping_sent_at >= cfg.pong_timeout:
                log.info("websocket %s: no pong in %ss; closing 1011", self._fd, cfg.pong_timeout)
                self._fail(1011, "keepalive ping timeout")
                self._take_output(False)
                self._check_state()
            return
        if self._writer is not None:
            # A blocked writer is already bounded by the write timeout.
            return
        self._ping_count += 1
        self._ping_nonce = self._ping_count.to_bytes(4, "big")
        self._ping_sent_at = now
        # Encoded here, not by websockets' send_ping: the same frame, with
        # less work per heartbeat (every idle connection pings every interval).
        # The sweep sends every due ping in this one loop iteration anyway:
        # nothing to batch, so no flush callback per ping.
        self._queue_control(encode_frame(PING, self._ping_nonce), now=True)
        if self._paused and self._may_read_paused():
            # Paused reads (a slow application) would hide the pong, and a
            # dead peer with them: read on until the pong (_read_paused).
            self._resume_reading()

    def _update_close_info(self) -> None:
        if self.close_code is not None:
            return
        p = self._p
        close: Close | None = p.close_rcvd or p.close_sent
        if close is not None:
            self.close_code = int(close.code)
            self.close_reason = close.reason

    def _check_state(self) -> None:
        p = self._p
        if self._finalized or p.state is OPEN:
            # Open: nothing to do (close_expected() is False once the
            # handshake succeeded); this runs after every read and flush.
            return
        self._update_close_info()
        if not self._recv_done:
            self._recv_done = True
            self._wake_reader()
            if self._space is not None:
                self._space.set()
            if self._paused and not self._peer_eof and self._may_read_paused():
                # Closing: read on to the peer's Close (or EOF) even if the
                # application never reads (within the pause budget).
                self._resume_reading()
        if p.state is CLOSED:
            self._finalize(1006, "connection lost")
        elif p.close_expected() and not self._out and self._close_timer is None:
            self._close_timer = self._loop.timer(self.config.close_timeout)
            self._close_timer.start(self._guard, self._finalize, 1006, "close timeout")

    def _finalize(self, code: int, reason: str) -> None:
        """Tear down: the single exit of every path (handshake, error, abort)."""
        if self._finalized:
            return
        self._finalized = True
        self._update_close_info()
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._recv_done = True
        self._stop_reading()
        for w in (self._reader, self._close_timer):
            if w is not None:
                w.close()
        self._reader = self._close_timer = None
        if self._keepalive is not None:
            self._keepalive.discard(self)
            self._keepalive = None
        writer, self._writer = self._writer, None
        if writer is not None and writer is not gevent.getcurrent():
            writer.kill(block=False)
        try:
            # The server owning the socket closes the descriptor; shutting it
            # down makes any write it might still attempt fail with EPIPE.
            os_socket(self._sock).shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._out.clear()
        self._out_bytes = self._out_msgs = 0
        self._wake_reader()
        if self._space is not None:
            self._space.set()
        self._closed.set()
        self._lifecycle.unregister(self)
        _open.discard(self)
        self._close_detached()
        if self._callbacks:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        # In registration order, each exactly once, never in the hub.
        if gevent.getcurrent() is gevent.get_hub():
            gevent.spawn(self._run_callbacks)
            return
        while self._callbacks:
            cb = self._callbacks[0]
            try:
                cb(self)
            except Exception:
                log.exception("websocket on_close callback %r failed", cb)
            finally:
                self._callbacks.pop(0)

