"""Notice that the client of an idle streaming response has left (FIN or RST).

While a streaming response is served, a read watcher on its socket wakes on
EOF or reset and raises :class:`~gstream.errors.ClientDeparted` in the
greenlet serving it, instead of waiting for its next write. Why, and what
each server kind detects: docs/server.md ("Departed clients").
"""

from __future__ import annotations

import enum
import io
import logging
import socket
from typing import Any

import gevent
from greenlet import getcurrent

from .errors import ClientDeparted
from .tlsio import is_tls, os_socket, tls_would_block

__all__ = ["Peer", "DepartureWatching", "prepare", "arm", "watch", "unwatch", "peer_state",
           "has_buffered", "read_ahead"]

log = logging.getLogger("gstream.departure")

_PEEK = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_TCP_INFO = getattr(socket, "TCP_INFO", None)
# linux/tcp_states.h: the peer's FIN has arrived (CLOSE_WAIT), or an RST (CLOSE).
_TCP_GONE = (7, 8)
#: Seconds between two looks at a TLS stream whose client sent a record:
#: a TLS 1.3 ``close_notify`` is encrypted like data, and its FIN may follow.
TLS_RECHECK = 0.25


class Peer(enum.Enum):
    """What the client's side of a connection shows (see :func:`peer_state`)."""

    QUIET = "quiet"
    """Nothing to read: still connected."""
    SENDING = "sending"
    """Bytes are waiting to be read (a pipelined request, or a TLS record)."""
    CLOSED = "closed"
    """The client closed its side (FIN)."""
    RESET = "reset"
    """The connection was reset (RST) or failed."""


def peer_state(sock: Any) -> Peer:
    """Look (without reading or blocking) at what the client of ``sock`` did."""
    try:
        data = os_socket(sock).recv(1, _PEEK)
    except (BlockingIOError, InterruptedError):
        return Peer.QUIET
    except OSError:
        return Peer.RESET  # ECONNRESET, ETIMEDOUT, or the socket closed under us
    return Peer.SENDING if data else Peer.CLOSED


def _tcp_gone(sock: Any) -> bool:
    """True once the peer's FIN (or an RST) arrived, even behind unread bytes (Linux)."""
    if _TCP_INFO is None:
        return False
    try:
        return os_socket(sock).getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] in _TCP_GONE
    except (OSError, IndexError):
        return False


class _Watch:
    """One watched response: its greenlet, its socket, the armed watcher (or None)."""

    __slots__ = ("greenlet", "sock", "watcher")

    def __init__(self, greenlet: Any, sock: Any) -> None:
        self.greenlet = greenlet
        self.sock = sock
        self.watcher: Any = None


# greenlet -> its watch. One small dict entry per stream is cheaper than an
# attribute on the handler (see the layout note in gstream/handler.py).
_watches: dict[Any, _Watch] = {}


def prepare(sock: Any) -> None:
    """Let :func:`arm` watch ``sock`` for the current greenlet (nothing is armed yet).

    For servers that know whether a request may be watched (no body, nothing
    read ahead) before they know whether its response is a stream.
    """
    glet = getcurrent()
    if glet not in _watches:
        _watches[glet] = _Watch(glet, sock)


def arm() -> bool:
    """Start watching the socket given to :func:`prepare` by this greenlet.

    From now until :func:`unwatch`, if the client closes or resets the
    connection, :class:`~gstream.errors.ClientDeparted` is raised in this
    greenlet wherever it waits. Returns False if nothing was prepared (or
    the watch was already stopped). Calling it again does nothing.
    """
    w = _watches.get(getcurrent())
    if w is None:
        return False
    if w.watcher is None:
        watcher = gevent.get_hub().loop.io(w.sock.fileno(), 1)  # 1: EV_READ
        watcher.start(_on_readable, w)
        w.watcher = watcher
    return True


def watch(sock: Any) -> bool:
    """:func:`prepare` and :func:`arm` in one call."""
    prepare(sock)
    return arm()


def unwatch() -> None:
    """Stop watching for the current greenlet (idempotent); call when its response ends."""
    w = _watches.pop(getcurrent(), None)
    if w is not None and w.watcher is not None:
        w.watcher.close()
        w.watcher = None


def _stop(w: _Watch) -> None:
    if _watches.get(w.greenlet) is w:
        del _watches[w.greenlet]
    if w.watcher is not None:
        w.watcher.close()
        w.watcher = None


def _on_readable(w: _Watch) -> None:
    # Runs in the hub, like a gevent.Timeout firing: it may throw into the
    # watched greenlet, which is switched out.
    state = peer_state(w.sock)
    if state is Peer.QUIET:
        return  # a spurious wake-up
    if state is Peer.SENDING:
        if not is_tls(w.sock) or _TCP_INFO is None:
            # A pipelined request: it is read after this response ends, as
            # before; a departure is then noticed at the next write only.
            # (Over TLS without TCP_INFO a close_notify cannot be told apart.)
            _stop(w)
            return
        if not _tcp_gone(w.sock):
            # TLS: maybe data, maybe a close_notify whose FIN is on its way.
            # Look again on a timer (the descriptor stays readable now).
            w.watcher.close()
            w.watcher = gevent.get_hub().loop.timer(TLS_RECHECK, TLS_RECHECK)
            w.watcher.start(_recheck_tls, w)
            return
        state = Peer.CLOSED
    _depart(w, state)


def _recheck_tls(w: _Watch) -> None:
    state = peer_state(w.sock)
    if state is Peer.RESET or state is Peer.CLOSED or _tcp_gone(w.sock):
        _depart(w, Peer.RESET if state is Peer.RESET else Peer.CLOSED)


def _depart(w: _Watch, state: Peer) -> None:
    _stop(w)
    glet = w.greenlet
    if not glet.dead:
        glet.throw(ClientDeparted(f"client {state.value} the connection"))


def has_buffered(rfile: Any, sock: Any) -> bool:
    """True if ``rfile`` holds (or the kernel has) bytes of a next request.

    ``peek`` returns the buffer when it is not empty and otherwise does one
    raw read; with the socket's timeout at 0 that read cannot block.
    """
    peek = getattr(rfile, "peek", None)
    if peek is None or sock is None:
        return True  # unknown reader: keep it
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return bool(peek(1))
    except (TimeoutError, BlockingIOError):
        return False
    except OSError as exc:
        # TLS: no complete record to read is "nothing", like EAGAIN.
        return not tls_would_block(exc)  # else let the normal path see the error
    finally:
        sock.settimeout(previous)


def read_ahead(buf: io.BytesIO | None) -> bool:
    """True if a reader's ``BytesIO`` read-ahead buffer (gunicorn's) holds bytes."""
    if buf is None:
        return True  # unknown: assume so
    return buf.seek(0, io.SEEK_END) > 0


class DepartureWatching:
    """Mixin for a ``gevent.pywsgi.WSGIHandler`` subclass: end a streaming
    response whose client has left (put it before ``WSGIHandler`` in the bases).

    Watching starts when the headers of a response without ``Content-Length``
    and not a sized body (a generator, an SSE stream, the ``write`` callable
    of an app that is still running) go out, if the request has no body and
    no next request was read ahead. Adds no instance attribute.
    """

    result: Any
    provided_content_length: Any
    wsgi_input: Any
    rfile: Any
    socket: Any
    environ: Any
    client_address: Any
    close_connection: bool

    def _write_with_headers(self, data: bytes) -> None:
        # pywsgi's once-per-response hook (the head goes out here), rather
        # than ``write``: no extra call on every chunk of a stream.
        super()._write_with_headers(data)  # type: ignore[misc]
        self.watch_departure()

    def watch_departure(self) -> None:
        """Start the watch if the response whose head just went out is a stream.

        Called once the head is out (a handler that replaces
        ``_write_with_headers`` calls it itself, as GStreamHandler does).
        """
        if (self.provided_content_length is None and not hasattr(self.result, "__len__")
                and self._request_done()):
            watch(self.socket)

    def _request_done(self) -> bool:
        # Nothing will be read until the response ends: no body, no next
        # request already buffered (its bytes would hide a departure).
        body = self.wsgi_input
        if body is None or body.content_length or body.chunked_input:
            return False
        rfile = self.rfile
        if getattr(rfile, "closed", True):
            return False
        return not has_buffered(rfile, self.socket)

    def run_application(self) -> None:
        try:
            super().run_application()  # type: ignore[misc]
        except ClientDeparted as exc:
            self.close_connection = True
            env = self.environ or {}
            log.debug("%s left %s %s during the response: %s", self.client_address,
                      env.get("REQUEST_METHOD"), env.get("PATH_INFO"), exc)
        finally:
            unwatch()
