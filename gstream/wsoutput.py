"""The outbound half of a WebSocket connection: queue, coalesced sends, writer.

Frames are queued as plain ``bytes`` (control frames as :class:`_Control`,
which the send buffer does not count) and flushed from one loop
callback per loop iteration (:class:`_Flusher`) with a single non-blocking
``send`` of the queued frames joined (up to 256 KiB). Only when the kernel
buffer is full is a writer greenlet started; it waits for writability under
the write timeout and exits once the queue is empty, so at most one writer
exists per connection and writes are serialized. A hub queues shared frames
with :meth:`OutboundQueue._push_shared` and flushes once per batch.
See docs/websocket.md.
"""

from __future__ import annotations

import logging
import socket
import weakref
from typing import TYPE_CHECKING, Any

import gevent
from gevent.socket import wait_write

from .tlsio import os_socket

if TYPE_CHECKING:
    from collections.abc import Callable

    import gevent.event
    from websockets.server import ServerProtocol

    from .wsconfig import WSConfig

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
    not drive the collector into a full pass over every connection (~70 ms
    at 5,000 connections, measured).
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
        _p: ServerProtocol
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
        _space: gevent.event.Event

        def _guard(self, fn: Callable[..., None], *args: Any) -> None: ...
        def _internal_error(self) -> None: ...
        def _finalize(self, code: int, reason: str) -> None: ...
        def _check_state(self) -> None: ...
        def _resume_reading(self) -> None: ...
        def _stop_reading(self) -> None: ...
        def _check_open(self) -> None: ...

    def _push_shared(self, frame: bytes) -> bool:
        """Hub fast path: queue a shared frame *without* scheduling a flush.

        Only for connections that share frames (no extension). The caller
        must call :meth:`_flush_pending` afterwards (a hub does it once per
        batch, so many queued frames leave in one ``send``). Returns False
        when the send buffer is full; raises :class:`Closed` once closing.
        """
        self._check_open()
        if self._out_msgs >= self.config.send_buffer:
            return False
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._out_msgs += 1
        return True

    def _queue_frame(self, frame: bytes) -> None:
        """Queue one encoded message frame and schedule a flush.

        Never written at once, even to an idle connection: measured, writing
        a reply straight away cut echo throughput at 50 clients from ~56-72k
        to ~39-46k round trips/s (each reply woke the client on its own; the
        end-of-iteration flush hands the clients their replies in batches).
        """
        self._out.append(frame)
        self._out_bytes += len(frame)
        self._out_msgs += 1
        self._schedule_flush()

    def _queue_control(self, frame: bytes) -> None:
        """Queue an encoded control frame (not counted against ``send_buffer``)."""
        self._out.append(_Control(frame))
        self._out_bytes += len(frame)
        self._schedule_flush()

    def _flush_pending(self) -> None:
        """Send what :meth:`_push_shared` queued, now, from the calling greenlet."""
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
                if type(chunk) is not _Control:
                    self._out_msgs -= 1
            else:
                rest = chunk[n:]
                out[done] = _Control(rest) if type(chunk) is _Control else rest
                n = 0
        if done:
            del out[:done]  # one slice: a list pops from the front in O(len)
        if self._out_msgs < self.config.send_buffer:
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
