"""The outbound half of a WebSocket connection: send API, send queue, coalesced flushes, writer.

Frames are queued as ``bytes`` and flushed once per loop iteration with one non-blocking
``send``; a writer greenlet exists only while the kernel buffer is full. A hub queues with
:meth:`OutboundQueue.push_shared` (one frame) or :meth:`OutboundQueue.push_shared_run` (a batch's
frames, joined once for all members) and sends with :meth:`OutboundQueue.flush`. docs/websocket.md.
"""

from __future__ import annotations

import logging
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any

import gevent
from gevent.socket import wait_write
from websockets.protocol import OPEN

from ..errors import Closed
from ..tlsio import os_socket
from .frames import BINARY, TEXT, Message, PreparedMessage, PreparedRun, encode_frame

if TYPE_CHECKING:
    from collections.abc import Callable

    import gevent.event

    from .config import WSConfig
    from .protocol import GStreamProtocol

__all__ = ["OutboundQueue"]

log = logging.getLogger("gstream.websocket")

_JOIN_LIMIT = 256 * 1024  # coalesce up to this many bytes per send()
_PAUSE_OUT_BYTES = 1 << 20  # stop reading while this much is stuck behind a slow peer


class _WriteTimeout(Exception):
    pass


class _Control(bytes):
    """A queued control frame (ping, pong, close): not counted as a message.

    A marker type rather than a ``(frame, is_message)`` pair: queueing a
    message then allocates nothing the garbage collector tracks, so a hub
    burst to thousands of members (one queued frame each per message) does
    not drive the collector into a full pass over every connection
    (docs/performance.md, third round).
    """

    __slots__ = ()


class _Flusher:
    """Flushes, from one loop callback, every connection that queued frames
    during this loop iteration.

    One callback for all rather than one per connection: cheaper, and gevent
    may split a long run of callbacks across iterations (its switch
    interval) but never one callback, so with hundreds of busy connections
    none of them waits an extra poll for its flush (fair tail latency).
    """

    __slots__ = ("__weakref__", "loop", "due", "scheduled")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.due: list[OutboundQueue] = []
        self.scheduled = False

    def add(self, conn: OutboundQueue) -> None:
        self.due.append(conn)
        if not self.scheduled:
            self.scheduled = True
            self.loop.run_callback(self.run)

    def run(self) -> None:
        self.scheduled = False
        due, self.due = self.due, []
        for conn in due:
            try:  # what _guard does, inline: one call less per connection
                conn._flush_now()
            except Exception:
                conn._internal_error()


_flushers: weakref.WeakKeyDictionary[Any, _Flusher] = weakref.WeakKeyDictionary()


def flusher_for(hub: Any) -> _Flusher:
    """The flusher of ``hub``'s loop (one per event loop)."""
    flusher = _flushers.get(hub)
    if flusher is None:
        flusher = _flushers[hub] = _Flusher(hub.loop)
    return flusher


class OutboundQueue:
    """Mixin of :class:`gstream.websocket.WebSocket`: its send queue and writer."""

    if not TYPE_CHECKING:  # the attributes below are WebSocket's slots
        __slots__ = ()
    else:
        config: WSConfig
        close_code: int | None
        close_reason: str
        _p: GStreamProtocol
        _sock: Any
        _raw: Any
        _fd: int
        _tls: bool
        _finalized: bool
        _reading: bool
        _paused: bool
        _peer_eof: bool
        _out: list[bytes]
        _out_bytes: int
        _out_msgs: int
        _eof_pending: bool
        _eof_sent: bool
        _flush_scheduled: bool
        _flusher: _Flusher
        _writer: gevent.Greenlet | None
        _space: gevent.event.Event | None

        def _guard(self, fn: Callable[..., None], *args: Any) -> None: ...
        def _internal_error(self) -> None: ...
        def _finalize(self, code: int, reason: str) -> None: ...
        def _check_state(self) -> None: ...
        def _resume_reading(self) -> None: ...
        def _stop_reading(self) -> None: ...

    # ------------------------------------------------------------ sending API
    def send(self, message: Message, timeout: float | None = None) -> None:
        """Send a text (``str``) or binary (bytes-like) message.

        Queues the frame; blocks while ``send_buffer`` messages are already
        waiting for a slow peer (backpressure), raising :class:`TimeoutError`
        after ``timeout`` seconds. Raises :class:`gstream.Closed` once closing.
        """
        if self._out_msgs >= self.config.send_buffer:
            self._wait_space(timeout)  # checks the connection is open, also after waiting
        else:
            self._check_open()
        self._queue_message(message)

    def try_send(self, message: Message) -> bool:
        """Queue ``message`` without blocking; False if the send buffer is full."""
        self._check_open()
        if self._out_msgs >= self.config.send_buffer:
            return False
        self._queue_message(message)
        return True

    def send_prepared(self, prepared: PreparedMessage, timeout: float | None = None) -> None:
        """Like :meth:`send` for a :class:`PreparedMessage` (no re-encoding)."""
        self._wait_space(timeout)
        self._queue_prepared(prepared)

    def try_send_prepared(self, prepared: PreparedMessage) -> bool:
        """Queue a prepared message without blocking; False if the buffer is full.

        This is what a hub calls in its fan-out loop: a False return is the
        hook for its slow-consumer policy (drop, or ``close(1008)``/``abort``).
        """
        self._check_open()
        if self._out_msgs >= self.config.send_buffer:
            return False
        self._queue_prepared(prepared)
        return True

    def send_prepared_drop_oldest(self, prepared: PreparedMessage) -> int:
        """Queue a prepared message without blocking, making room if needed.

        When the send buffer is full, the oldest queued messages that have
        not started to leave are dropped to make room; returns how many
        messages were lost (0 if none). With permessage-deflate nothing
        queued can be dropped (each compressed frame depends on the ones
        before it), so the new message is refused instead and 1 is returned.
        Control frames (pongs, the close frame) are never dropped.
        """
        self._check_open()
        limit = self.config.send_buffer
        if self._out_msgs < limit:
            self._queue_prepared(prepared)
            return 0
        if self._p.extensions:
            return 1
        # Index 0 may be partly sent already; everything behind it is whole.
        # Without extensions a queued chunk is one message, or a hub's
        # PreparedRun of several, cut at a frame boundary when dropping all
        # of it would drop more than needed: the same messages go as if each
        # had been queued on its own.
        out = self._out
        head = out[0] if out else None
        if type(head) is PreparedRun and head.messages > 1 and not self._tls:
            # A run at the head: only its first message is (maybe) in flight;
            # the others are as droppable as if each had been queued alone.
            # Not over TLS: a write that did not complete is retried with the
            # same buffer (_next_chunk), so the head stays as it is.
            out[0:1] = head.split_first()
        dropped = 0
        i = 1
        while self._out_msgs >= limit and i < len(out):
            chunk = out[i]
            if type(chunk) is _Control:
                i += 1
                continue
            lost = 1
            if type(chunk) is PreparedRun:
                lost = chunk.messages
                need = self._out_msgs - limit + 1
                if lost > need:
                    rest = chunk.without_first(need)
                    out[i] = rest
                    self._out_bytes -= len(chunk) - len(rest)
                    self._out_msgs -= need
                    dropped += need
                    break
            del out[i]
            self._out_bytes -= len(chunk)
            self._out_msgs -= lost
            dropped += lost
        if self._out_msgs >= limit:
            return dropped + 1  # nothing left to drop (send_buffer of 1)
        self._queue_prepared(prepared)
        return dropped

    # ---------------------------------------------------------------- queueing
    def _check_open(self) -> None:
        if self._finalized or self._p.state is not OPEN:
            raise Closed(self.close_reason or "connection closed", self.close_code)

    def _wait_space(self, timeout: float | None) -> None:
        self._check_open()
        if self._out_msgs < self.config.send_buffer:
            return
        if gevent.getcurrent() is gevent.get_hub():
            raise RuntimeError("send() would block in the hub; use try_send()")
        deadline = None if timeout is None else time.monotonic() + timeout
        space = self._space
        if space is None:  # made on first need: most connections never wait
            space = self._space = gevent.event.Event()
        while self._out_msgs >= self.config.send_buffer:
            space.clear()
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not space.wait(remaining) and self._out_msgs >= self.config.send_buffer:
                raise TimeoutError("send buffer full")
            self._check_open()

    # The callers have checked that the connection is open (once each).
    def _queue_message(self, message: Message) -> None:
        if isinstance(message, str):
            self._queue_payload(message.encode("utf-8"), True, None)
        elif isinstance(message, (bytes, bytearray, memoryview)):
            self._queue_payload(bytes(message), False, None)
        else:
            raise TypeError(f"send() takes str or bytes, not {type(message).__name__}")

    def _queue_prepared(self, prepared: PreparedMessage) -> None:
        self._queue_payload(prepared.payload, prepared.is_text, prepared.frame)

    def _queue_payload(self, payload: bytes, is_text: bool, frame: bytes | None) -> None:
        if self._p.extensions:  # permessage-deflate: websockets compresses, per connection
            if is_text:
                self._p.send_text(payload)
            else:
                self._p.send_binary(payload)
            self._take_output(True)
            return
        # A plain connection takes an unmasked frame as is: encoded here (a
        # less work per message than a websockets Frame) unless
        # a broadcast already encoded it once for everyone.
        if frame is None:
            frame = encode_frame(TEXT if is_text else BINARY, payload)
        self._queue_frame(frame)

    def push_shared(self, frame: bytes, allowance: int = 0) -> bool:
        """Hub fast path: queue a shared frame *without* scheduling a flush.

        Only for connections that share frames (no extension). The caller
        must call :meth:`flush` afterwards (a hub does it once per
        batch, so many queued frames leave in one ``send``). Returns False
        when the send buffer is full; raises :class:`Closed` once closing.
        ``allowance`` queued frames are not counted while no writer waits
        for the peer (a hub passes those of its current batch, which leave
        with its flush): a peer that reads gets one ``send`` per batch, and
        a peer that stopped reading is held to ``send_buffer``.
        """
        self._check_open()
        if self._writer is not None:
            allowance = 0
        if self._out_msgs - allowance >= self.config.send_buffer:
            return False
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._out_msgs += 1
        return True

    def push_shared_run(self, run: PreparedRun, allowance: int = 0) -> bool:
        """Hub fast path: queue all of ``run``'s messages as one chunk, no flush.

        :meth:`push_shared` for ``run.messages`` messages at once: it succeeds
        exactly when pushing each of them with ``allowance`` (this batch's
        frames, growing by one per frame) would have, that is while no
        writer waits and the frames queued before this batch are fewer than
        ``send_buffer``. Returns False otherwise, queueing nothing (the hub
        then takes the per-frame path, and with it the slow-member policy);
        raises :class:`Closed` once closing.
        """
        self._check_open()
        if self._writer is not None or self._out_msgs - allowance >= self.config.send_buffer:
            return False
        self._out.append(run)
        self._out_bytes += len(run)
        self._out_msgs += run.messages
        return True

    def _queue_frame(self, frame: bytes) -> None:
        """Queue one encoded message frame and schedule a flush.

        Never written at once, even to an idle connection: the end-of-iteration
        flush hands the clients their replies in batches, which measured faster
        than one wake-up per reply (docs/websocket.md, "I/O model").
        """
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._out_msgs += 1
        self._schedule_flush()

    def _queue_control(self, frame: bytes, now: bool = False) -> None:
        """Queue an encoded control frame (not counted against ``send_buffer``).

        With ``now``, an idle connection writes it at once; otherwise (and
        behind queued frames or a writer) it leaves with the next flush.
        """
        self._out.append(_Control(frame))
        self._out_bytes += len(frame)
        if now:
            self.flush()
        else:
            self._schedule_flush()

    def flush(self) -> None:
        """Send what is queued, now, from the calling greenlet, unless a flush
        is already due or a writer owns the connection (they will send it)."""
        if self._out and self._writer is None and not self._flush_scheduled and not self._finalized:
            self._guard(self._flush_now)

    def _take_output(self, is_message: bool) -> None:
        chunks = self._p.data_to_send()
        if not chunks:
            return  # nothing new (most reads): no flush to schedule
        for chunk in chunks:
            if chunk:
                if is_message:
                    self._out.append(chunk)
                    self._out_msgs += 1
                else:
                    self._out.append(_Control(chunk))
                self._out_bytes += len(chunk)
            else:
                self._eof_pending = True
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Deferred to the end of this loop iteration so that frames queued in
        # a burst leave in one send() call.
        if self._writer is None and not self._flush_scheduled and not self._finalized:
            self._flush_scheduled = True
            self._flusher.add(self)

    def _next_chunk(self) -> bytes:
        if self._tls or len(self._out) == 1 or len(self._out[0]) >= _JOIN_LIMIT:
            # Over TLS a write that did not complete must be retried with the
            # same buffer: the queue's first frame is that buffer.
            return self._out[0]
        if self._out_bytes <= _JOIN_LIMIT:
            return b"".join(self._out)  # the common case: all of it
        parts = []
        size = 0
        for chunk in self._out:
            parts.append(chunk)
            size += len(chunk)
            if size >= _JOIN_LIMIT:
                break
        return b"".join(parts)

    def _consume(self, n: int) -> None:
        if n == self._out_bytes:
            # Everything left (the common case): no walk over the queue.
            self._out.clear()
            self._out_bytes = self._out_msgs = 0
            if self._space is not None:
                self._space.set()
            return
        self._out_bytes -= n
        out = self._out
        done = 0
        while n:
            chunk = out[done]
            if n >= len(chunk):
                done += 1
                n -= len(chunk)
                if type(chunk) is PreparedRun:
                    self._out_msgs -= chunk.messages
                elif type(chunk) is not _Control:
                    self._out_msgs -= 1
            else:
                if type(chunk) is PreparedRun:
                    # The rest of a run counts its messages not yet wholly
                    # sent (the one cut in the middle included): exact.
                    tail = chunk.tail(n)
                    self._out_msgs -= chunk.messages - tail.messages
                    out[done] = tail
                elif type(chunk) is _Control:
                    out[done] = _Control(chunk[n:])
                else:
                    out[done] = chunk[n:]
                n = 0
        if done:
            del out[:done]  # one slice: a list pops from the front in O(len)
        if self._space is not None and self._out_msgs < self.config.send_buffer:
            self._space.set()

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        if self._writer is not None or self._finalized:
            return
        try:
            while self._out:
                data = self._next_chunk()
                n = self._raw.send(data)
                self._consume(n)
                if n < len(data):
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._finalize(1006, "connection lost")
            return
        if self._out:
            self._writer = gevent.spawn(self._write_loop)
        else:
            self._drained()

    def _write_loop(self) -> None:
        try:
            while self._out and not self._finalized:
                data = self._next_chunk()
                try:
                    n = self._raw.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                if n:
                    self._consume(n)
                    continue
                if len(self._out) and self._out_bytes > _PAUSE_OUT_BYTES and self._reading:
                    self._stop_reading()  # don't read what we cannot answer
                wait_write(self._fd, timeout=self.config.write_timeout,
                           timeout_exc=_WriteTimeout())
        except _WriteTimeout:
            log.info("websocket %s: peer stopped reading for %ss; closing",
                     self._fd, self.config.write_timeout)
            self._writer = None
            self._finalize(1006, "write timeout")
            return
        except OSError:
            self._writer = None
            self._finalize(1006, "connection lost")
            return
        self._writer = None
        if not self._finalized:
            if not self._reading and not self._paused and not self._peer_eof:
                self._resume_reading()
            self._guard(self._drained)

    def _drained(self) -> None:
        if self._out:
            self._schedule_flush()
            return
        if self._eof_pending and not self._eof_sent:
            self._eof_sent = True
            try:
                os_socket(self._sock).shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._check_state()
