"""gstream's server: gevent's pywsgi with a connection cap and graceful shutdown.

:class:`Server` wraps :class:`gevent.pywsgi.WSGIServer`: at most
``max_connections`` seats (:class:`gstream.seats.Seats`; past the cap queue or
answer 503), ``header_timeout`` for request heads (:mod:`gstream.deadline`),
strict request heads (:mod:`gstream.strict`), proxy headers
(:mod:`gstream.proxy`) and a drain on SIGTERM/SIGINT. The reasoning is in
docs/server.md. Logs go to ``gstream.server`` and, optionally, ``gstream.access``.
"""

from __future__ import annotations

import errno
import http.client
import logging
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent
import gevent.event
from gevent import monkey, pywsgi
from gevent import socket as gsocket
from gevent.pool import Pool

from . import limits
from .accessline import AccessLine
from .deadline import HeadDeadline
from .handler import GStreamHandler as _DefaultHandler
from .lifecycle import ENVIRON_KEY as LIFECYCLE_KEY
from .lifecycle import Lifecycle
from .lifecycle import lifecycle as process_lifecycle
from .policies import Overflow
from .proxy import DEFAULT_FORWARDED_ALLOW_IPS, ProxyHeaders
from .seats import Seats
from .strict import StrictRequests

__all__ = ["Server", "base_url", "serve"]

log = logging.getLogger("gstream.server")

_REJECT_BODY = b"server at capacity, retry later\n"
_REJECT_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_REJECT_BODY)).encode() + b"\r\n\r\n" + _REJECT_BODY
)
# Rejections run in short greenlets of their own; past this many at once a
# flood is simply closed, so rejecting can't itself exhaust memory.
_MAX_REJECTING = 256
# accept() errors that mean "no descriptor (or kernel memory) for now": pause
# accepting and retry after this many seconds, or when a seat frees.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EMFILE_RETRY = 0.1


class _HeadReader:
    """Reads header lines for pywsgi, failing once the head exceeds ``limit`` bytes (431).

    http.client bounds each line (64 KiB) and the number of lines (100), so a
    head could still be ~6.5 MB per connection; this bounds the total.
    """

    __slots__ = ("_fp", "_left")

    def __init__(self, fp: Any, limit: int) -> None:
        self._fp = fp
        self._left = limit

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._fp.readline(size)
        self._left -= len(line)
        if self._left < 0:
            # pywsgi turns LineTooLong into a quiet 400 Bad Request.
            raise http.client.LineTooLong("request head")
        return line


def _managed_handler(base: Any) -> Any:
    """Subclass ``base`` (a pywsgi handler) with gstream's server bookkeeping
    and, if ``base`` lacks them, the access line (gstream.accessline), the
    request-head deadline (gstream.deadline) and strict request parsing
    (gstream.strict)."""
    bases = tuple(m for m in (AccessLine, HeadDeadline, StrictRequests) if not issubclass(base, m)) + (base,)

    class Managed(*bases):  # type: ignore[misc]
        # No instance attribute of its own (see _LAYOUT in handler.py): past
        # 29 per instance CPython gives every handler a full dict.

        @property
        def request_head_timeout(self) -> float | None:
            # HeadDeadline's limit, which is the server's header_timeout.
            return self.server.controller.header_timeout

        def handle_one_request(self) -> Any:
            ctl: Server = self.server.controller
            if ctl.draining:
                return None
            seats = ctl.seats
            # Once a response went out on this connection (pywsgi's status
            # stays set until the next one), it is kept alive: a seat a
            # waiting client may take (Seats.reclaim).
            seats.waiting(self, self.status is not None)
            try:
                result = super().handle_one_request()
            finally:
                seats.busy(self)
            if result is True and ctl.draining:
                return None
            return result

        def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (pywsgi's name)
            # StrictRequests (below in the MRO) answers 431 past the limit.
            limit = self.server.controller.max_header_bytes
            return super().MessageClass(_HeadReader(fp, limit) if limit else fp, *args)

        def _log_error(self, t: Any, v: Any, tb: Any) -> None:
            # pywsgi hands application errors to the hub, which prints them to
            # stderr; route them through logging like the rest of the server.
            if issubclass(t, gevent.GreenletExit):
                return
            env: dict[str, Any] = self.environ or {}
            log.error("application error in %s %s from %s", env.get("REQUEST_METHOD"),
                      env.get("PATH_INFO"), self.client_address, exc_info=(t, v, tb))

        def get_environ(self) -> Any:
            # The head is complete (HeadDeadline's get_environ ends its deadline).
            ctl = self.server.controller
            ctl.seats.busy(self)
            env = super().get_environ()
            env[LIFECYCLE_KEY] = ctl.lifecycle  # its streams register there (lifecycle_for)
            proxy = ctl.proxy_headers
            if proxy is not None:  # behind a reverse proxy: the client's view
                proxy.apply(env)
            return env

        def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
            if self.server.controller.draining and not status.startswith("101"):
                headers = [h for h in headers if h[0].lower() != "connection"]
                headers.append(("Connection", "close"))
            return super().start_response(status, headers, exc_info)

    Managed.__name__ = Managed.__qualname__ = f"Managed{base.__name__}"
    return Managed


class _WSGIServer(pywsgi.WSGIServer):
    """pywsgi's server, reporting to a :class:`Server`.

    Seats under the cap are counted here, in the accept callback, rather
    than by a bounded :class:`gevent.pool.Pool`: a pool only knows its own
    greenlets, while a seat can also be held by a detached WebSocket session or SSE stream,
    and a bounded pool's ``spawn`` blocks, which the accept callback (run by
    the event loop itself) must never do.
    """

    controller: Server
    out_of_fds = False
    """True while accepting is paused for want of a descriptor."""
    _fd_timer: Any = None

    def full(self) -> bool:
        """Whether to leave new connections in the listen backlog (queue mode at the cap).

        Not while an idle keep-alive connection's seat can be had (Seats.reclaim).
        """
        seats = self.controller.seats
        return (self.controller.overflow == Overflow.QUEUE and seats.full
                and not seats.reclaimable)

    def resume_accepting(self) -> None:
        """Accept again (after a seat or a descriptor freed), if the server is running."""
        if self.started and not self.full():
            self.start_accepting()

    def do_read(self) -> Any:
        try:
            args = super().do_read()
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            self._pause_accepting(exc)
            return None
        if args and self.out_of_fds:
            self.out_of_fds = False
            log.info("descriptors available again: accepting at %d connections",
                     self.controller.connections)
        return args

    def _pause_accepting(self, exc: OSError) -> None:
        # The connection stays in the listen backlog; retrying at once would
        # spin (the listener stays readable). Retry shortly, or as soon as a
        # seat (and so a descriptor) frees: see Server._seat_freed.
        ctl = self.controller
        if not self.out_of_fds:
            self.out_of_fds = True
            log.warning("out of file descriptors (%s) at %d connections: pausing accepts, "
                        "waiting clients stay in the listen backlog",
                        errno.errorcode.get(exc.errno or 0, exc.errno), ctl.connections)
        self.stop_accepting()
        if self._fd_timer is None:
            self._fd_timer = self.loop.timer(_EMFILE_RETRY)
        # (again() would stop a timer without a repeat instead of restarting it)
        self._fd_timer.stop()
        self._fd_timer.start(self.resume_accepting)

    def close(self) -> None:
        if self._fd_timer is not None:
            self._fd_timer.close()
            self._fd_timer = None
        super().close()

    def do_handle(self, sock: Any, address: Any) -> None:
        # Runs in the accept callback: decide here, without blocking, whether
        # this connection gets a seat, so a burst can't overshoot the cap.
        ctl = self.controller
        seats = ctl.seats
        if (seats.full and not seats.reclaim()
                and ctl.overflow == Overflow.REJECT):  # (in queue mode full() kept it waiting)
            ctl.rejected += 1
            if not seats.start_rejecting():
                self.do_close(sock)  # a flood: close without an answer
                return
            ctl.pool.spawn(self._serve, sock, address, True)
            return
        seats.take()
        try:
            ctl.pool.spawn(self._serve, sock, address, False)
        except BaseException:
            seats.release()
            self.do_close(sock)
            raise

    def _serve(self, sock: Any, address: Any, reject: bool) -> None:
        ctl = self.controller
        try:
            if sock.family in (gsocket.AF_INET, gsocket.AF_INET6):
                # pywsgi sends headers and body in two writes; with Nagle on,
                # the body waits for the client's delayed ACK (~40 ms).
                try:
                    sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
                except OSError:
                    pass
            conn = sock
            if self.ssl_enabled:
                try:
                    conn = self.wrap_socket(sock, **self.ssl_args)
                except OSError as exc:  # a failed handshake: the client's problem
                    log.debug("TLS handshake with %s failed: %s", address, exc)
                    return
            try:
                if reject:
                    _reject(conn)
                else:
                    self.handle(conn, address)
            finally:
                if conn is not sock:
                    conn.close()
        finally:
            self.do_close(sock)
            if reject:
                ctl.seats.end_rejecting()
            else:
                ctl.seats.release()

    def claim_detached(self) -> Callable[[], None] | None:
        """A seat for a connection that outlives its handler greenlet.

        Called by :meth:`GStreamHandler.detach` (a callback-served WebSocket)
        and for a detached streaming response (:mod:`gstream.detached`). The session takes a seat of
        its own (counted in :attr:`Server.connections`) until the returned
        release is called; its handler greenlet gives back the connection's
        seat as it ends a moment later, so for that moment the connection
        counts twice (on the safe side of the cap). None when draining.
        """
        ctl = self.controller
        if ctl.draining:
            return None
        ctl.seats.take()
        return _DetachedSlot(ctl.seats)


class _DetachedSlot:
    """The release of a detached session's seat (callable once; later calls do nothing).

    A small object rather than a closure: one per idle WebSocket session.
    """

    __slots__ = ("seats",)

    def __init__(self, seats: Seats) -> None:
        self.seats: Seats | None = seats

    def __call__(self) -> None:
        seats, self.seats = self.seats, None
        if seats is not None:
            seats.release()


def _reject(sock: Any) -> None:
    """Answer 503 politely: read the request head first so closing doesn't reset."""
    try:
        sock.settimeout(1.0)
        buf = b""
        while b"\r\n\r\n" not in buf and len(buf) < 16384:
            data = sock.recv(4096)
            if not data:
                break
            buf += data
        sock.sendall(_REJECT_RESPONSE)
        sock.shutdown(gsocket.SHUT_WR)
        sock.recv(4096)  # wait (bounded) for the client to close first
    except OSError:
        pass


def base_url(host: str, port: int, secure: bool) -> str:
    """The base URL of a server listening on (``host``, ``port``), e.g. ``http://127.0.0.1:8000``."""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{'https' if secure else 'http'}://{host}:{port}"


class Server:
    """A gevent WSGI server for apps with long-lived SSE and WebSocket streams.

    Args:
        app: the WSGI application.
        host, port: where to listen (port 0 picks a free port; see :attr:`port`).
        max_connections: the most connections handled at once.
        overflow: past the cap, ``"queue"`` (wait in the listen backlog) or
            ``"reject"`` (answer ``503 Service Unavailable`` with ``Retry-After``).
        certfile, keyfile: serve HTTPS with this certificate and key.
        access_log: log each request to the ``gstream.access`` logger.
        shutdown_timeout: seconds a graceful shutdown may take in total.
        header_timeout: seconds a client has to send a complete request head
            (also the keep-alive idle limit): a partial head gets ``408``, an
            idle connection is closed (:mod:`gstream.deadline`); ``None`` or 0
            disables it.
        max_header_bytes: the largest request head (header lines) accepted;
            larger heads get ``431``. ``None`` or 0 leaves only http.client's
            limits (100 lines of 64 KiB).
        handler_class: the pywsgi handler class (default: gstream's
            WebSocket-aware handler when available, else pywsgi's).
        backlog: the listen backlog (where queued connections wait); default
            :func:`gstream.limits.default_backlog`, ``min(4096, somaxconn)``.
        lifecycle: the stream registry to drain (default: one of its own, a
            child of the process-wide one). Streams find it in the environ
            (``gstream.lifecycle``); stopping the server ends them and streams
            registered with the process-wide registry by hand, never another
            server's.
        shutdown_reason: the reason given to streams when shutting down.
        forwarded_allow_ips: the peers (addresses, networks, or ``"*"``)
            whose ``X-Forwarded-For``/``-Proto``/``-Host`` and ``Forwarded``
            headers set ``REMOTE_ADDR``, ``wsgi.url_scheme`` and ``HTTP_HOST``
            (see :class:`gstream.proxy.ProxyHeaders` and docs/deploy.md).
            Default: loopback only, like gunicorn. None ignores them.
        listener: a socket already bound and listening (e.g. inherited from
            :class:`gstream.workers.Supervisor`, which binds once and forks);
            ``host`` and ``port`` are then ignored and the socket is made
            non-blocking. ``backlog`` only names what it was listened with.
    """

    def __init__(
        self,
        app: Callable[..., Any],
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        max_connections: int = 10_000,
        overflow: Overflow | str = Overflow.QUEUE,
        certfile: str | None = None,
        keyfile: str | None = None,
        access_log: bool = False,
        shutdown_timeout: float = 10.0,
        header_timeout: float | None = 10.0,
        max_header_bytes: int | None = 65536,
        handler_class: type | None = None,
        backlog: int | None = None,
        lifecycle: Lifecycle | None = None,
        shutdown_reason: str = "server shutting down",
        forwarded_allow_ips: str | Iterable[str] | None = DEFAULT_FORWARDED_ALLOW_IPS,
        listener: socket.socket | None = None,
    ) -> None:
        overflow = Overflow.parse(overflow, "overflow")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if bool(certfile) != bool(keyfile):
            raise ValueError("certfile and keyfile go together")
        self.app = app
        self.overflow = overflow
        self.shutdown_timeout = shutdown_timeout
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes or 0
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle(parent=process_lifecycle)
        self.shutdown_reason = shutdown_reason
        self.proxy_headers = (None if forwarded_allow_ips is None
                              else ProxyHeaders(forwarded_allow_ips))
        """Whose proxy headers are honoured (None: nobody's)."""
        self.secure = bool(certfile)
        self.draining = False
        """True once a graceful shutdown has begun."""
        self.rejected = 0
        """Connections answered ``503`` because the server was at capacity."""
        self.backlog = limits.default_backlog() if backlog is None else backlog
        """The listen backlog asked of the kernel (which clamps it to somaxconn)."""
        self.seats = Seats(max_connections, _MAX_REJECTING, self._seat_freed)
        """The one count of the cap (and the idle connections that may give a seat up)."""
        self._stopped = gevent.event.Event()
        self._stopper: gevent.Greenlet | None = None
        self._signals: list[Any] = []
        self._alive: Any = None
        # Every connection's greenlet, for shutdown; the cap is counted in
        # seats, not by the pool (see _WSGIServer).
        self.pool = Pool()
        handler = _managed_handler(handler_class or _DefaultHandler)
        kwargs: dict[str, Any] = {}
        if certfile:
            kwargs.update(certfile=certfile, keyfile=keyfile)
        if listener is not None:
            listener.setblocking(False)  # pywsgi's accept expects it (EAGAIN, not a wait)
        else:
            kwargs["backlog"] = self.backlog
        self._wsgi = _WSGIServer(
            (host, port) if listener is None else listener, app, spawn=self.pool.spawn,
            handler_class=handler, log=logging.getLogger("gstream.access") if access_log else None,
            error_log=log, **kwargs,
        )
        self._wsgi.controller = self

    # -- introspection ---------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port once started."""
        addr = self._wsgi.address
        return addr[0], addr[1]

    @property
    def port(self) -> int:
        """The bound port (the real one when created with port 0)."""
        return self.address[1]

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000``."""
        return base_url(*self.address, self.secure)

    @property
    def connections(self) -> int:
        """Seats held now: connections being served, detached WebSocket sessions and SSE streams
        included (rejections in progress are not counted)."""
        return self.seats.held

    @property
    def max_connections(self) -> int:
        """The most connections handled at once (lowered at start to fit the open-files limit)."""
        return self.seats.limit

    @max_connections.setter
    def max_connections(self, value: int) -> None:
        self.seats.limit = value

    # -- seats -------------------------------------------------------------

    def _seat_freed(self) -> None:
        # A seat (and a descriptor) may be had: a client waiting in the
        # backlog can be accepted, also after an out-of-descriptors pause.
        if not self.draining:
            self._wsgi.resume_accepting()

    def _fit_descriptors(self) -> None:
        """Raise RLIMIT_NOFILE as far as the cap needs; lower the cap to what it allows."""
        seats = self.seats
        reject = self.overflow == Overflow.REJECT
        extra = limits.FD_RESERVE + (seats.max_rejecting if reject else 0)
        soft = limits.raise_nofile_limit(self.max_connections + extra)
        if soft is None:
            return
        if reject:
            # Rejections hold a descriptor each too; on a small limit, fewer at once.
            seats.max_rejecting = max(1, min(_MAX_REJECTING, soft // 8))
            extra = limits.FD_RESERVE + seats.max_rejecting
        budget = max(1, soft - extra)
        if budget < self.max_connections:
            log.warning("max_connections lowered from %d to %d: the open-files limit "
                        "(RLIMIT_NOFILE) is %d, and %d descriptors are kept for the rest",
                        self.max_connections, budget, soft, extra)
            self.max_connections = budget

    # -- running ---------------------------------------------------------

    def start(self) -> None:
        """Bind and start accepting in the background (returns at once)."""
        self.lifecycle.reset()
        if not monkey.is_module_patched("socket"):
            # Unpatched, any blocking call of the app (Redis, HTTP, a database)
            # freezes every connection; easy to miss, so say it once, loudly.
            log.warning("gstream: the socket module is not patched by gevent, so blocking calls "
                        "in the application freeze every connection: put `from gevent import "
                        "monkey; monkey.patch_all()` first in the program (`gstream serve` does)")
        self._fit_descriptors()
        self._wsgi.start()
        # Keeps the event loop alive while serving: at the cap the listener
        # stops watching, and streams that only wait on events (an idle SSE
        # subscriber, a detached WebSocket) hold no watcher of their own, so
        # the loop would find nothing to wait for and serve_forever() would
        # end in LoopExit, dropping every connection.
        if self._alive is None:
            self._alive = gevent.get_hub().loop.async_()
            self._alive.start(_no_op)
        ceiling = limits.somaxconn()
        if ceiling is not None and self.backlog > ceiling:
            log.warning("listen backlog %d is capped by the kernel at net.core.somaxconn=%d",
                        self.backlog, ceiling)
        log.info("gstream serving on %s (max %d connections, overflow=%s, backlog %d)",
                 self.url, self.max_connections, self.overflow, self.backlog)

    def install_signal_handlers(
            self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Shut down gracefully on ``signals`` (a second signal cuts it short).

        A worker of :class:`gstream.workers.Supervisor` takes SIGTERM only: a
        terminal's Ctrl-C reaches the whole process group, and the supervisor
        forwards it as SIGTERM, which would otherwise count as a second signal.
        """
        for signum in signals:
            self._signals.append(gevent.signal_handler(signum, self._on_signal, signum))

    def _on_signal(self, signum: int) -> None:
        if self._stopper is None:
            log.info("received %s: shutting down gracefully", signal.Signals(signum).name)
            self._stopper = gevent.spawn(self.stop)
        else:
            log.warning("received %s again: closing every connection now",
                        signal.Signals(signum).name)
            gevent.spawn(self._force_close)

    def serve_forever(self, install_signals: bool = True) -> None:
        """Start if needed, then block until the server has stopped.

        With ``install_signals``, SIGTERM and SIGINT start a graceful
        shutdown (the handlers are removed again on return).
        """
        if not self._wsgi.started:
            self.start()
        if install_signals:
            self.install_signal_handlers()
        try:
            self._stopped.wait()
        finally:
            for handler in self._signals:
                handler.cancel()
            self._signals.clear()

    def stop(self, timeout: float | None = None) -> bool:
        """Shut down gracefully within ``timeout`` (default ``shutdown_timeout``) seconds.

        Stops accepting, closes idle keep-alive connections, asks registered
        streams to end, waits for in-flight requests, and closes whatever is
        left at the deadline. Returns True when everything ended in time.
        Safe to call more than once (later calls wait for the first).
        """
        if self.draining:
            self._stopped.wait()
            return True
        self.draining = True
        timeout = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + max(0.0, timeout)
        log.info("shutting down: %d connections, %d streams, deadline %.1f s",
                 self.connections, len(self.lifecycle), timeout)
        self._wsgi.close()  # no new connections
        self.seats.close_waiting()
        left = self.lifecycle.shutdown_all(max(0.0, deadline - time.monotonic()),
                                           self.shutdown_reason)
        if left:
            log.warning("%d streams did not end before the deadline", left)
            self.lifecycle.abort_all()
        # Handlers that were between requests when the drain began, or that
        # just finished one, must not linger until the deadline.
        while self.pool and time.monotonic() < deadline:
            self.seats.close_waiting()
            self.pool.join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        # A stream closed at the deadline (a detached one holds no greenlet
        # the pool would wait for) did not end in time either.
        clean = not self.pool and not left
        if self.pool:
            log.warning("%d connections still open at the deadline; closing them", len(self.pool))
            self._force_close()
        log.info("server stopped%s", "" if clean else " (some connections were cut)")
        self._let_loop_go()
        self._stopped.set()
        return clean

    def _let_loop_go(self) -> None:
        if self._alive is not None:
            self._alive.close()
            self._alive = None

    def _force_close(self) -> None:
        self.pool.kill(block=True, timeout=1)
        self._let_loop_go()
        self._stopped.set()


def _no_op() -> None:
    """The callback of the watcher that keeps the loop alive (it never fires)."""


def serve(
    app: Callable[..., Any],
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ready: Callable[[Server], Any] | None = None,
    install_signals: bool = True,
    **options: Any,
) -> Server:
    """Run ``app`` until a graceful shutdown (SIGTERM/SIGINT); return the stopped Server.

    ``options`` are :class:`Server` arguments. ``ready(server)`` is called
    once the server listens (e.g. to print :attr:`Server.url`).
    The process should be monkey-patched by gevent before the application
    is imported (``gstream serve`` does it for you).
    """
    server = Server(app, host, port, **options)
    server.start()
    if ready is not None:
        ready(server)
    server.serve_forever(install_signals=install_signals)
    return server
