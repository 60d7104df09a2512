"""gunicorn's gevent workers with gstream's graceful shutdown.

gstream's SSE streams and WebSockets work under gunicorn's own gevent
workers as they are (``gunicorn -k gevent``). What those workers cannot do
is end them politely on ``SIGTERM``: they stop accepting and wait up to
``--graceful-timeout`` for connections to finish, which long-lived streams
never do, and then kill them. These workers also ask every live gstream
stream to end when ``SIGTERM`` arrives (SSE: a final event and a
``retry:`` hint; WebSocket: close 1001), so a rolling restart costs
clients one quick reconnect::

    gunicorn -k gstream.contrib.gunicorn.GeventWorker -w 4 myapp:app
    gunicorn -k gstream.contrib.gunicorn.GeventPyWSGIWorker -w 4 myapp:app

Both refuse malformed request heads as gstream's server does (RFC 9112;
docs/security.md): ``GeventPyWSGIWorker`` through :mod:`gstream.strict`,
``GeventWorker`` by checking what gunicorn's own parser lets through.

They also keep keep-alive connections fair, as ``GStreamHandler`` does: gunicorn's
loops read a connection's next request without going back to the event loop
when it has already arrived, so one fast or pipelining client could hold the
worker while every other connection waited. Between two requests on one
connection these workers let the loop run once (~6 us).
"""

from __future__ import annotations

from typing import Any

import gevent
from gunicorn.workers import ggevent

from .. import httpcheck
from ..errors import InvalidRequest
from ..fairness import FairKeepAlive, yield_to_ready_io
from ..lifecycle import lifecycle
from ..strict import StrictRequests, refuse

__all__ = ["GeventWorker", "GeventPyWSGIWorker"]

#: Seconds kept back from ``--graceful-timeout`` for the worker's own exit.
MARGIN = 1.0


class _Draining:
    """Mixin: on SIGTERM, end gstream's streams besides stopping to accept."""

    alive: bool
    cfg: Any
    log: Any

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = self.alive
        super().handle_exit(sig, frame)  # type: ignore[misc]
        if first:
            # Out of the signal handler: ending streams may block briefly.
            gevent.spawn(self._drain_streams)

    def _drain_streams(self) -> None:
        timeout = max(0.5, float(self.cfg.graceful_timeout) - MARGIN)
        left = lifecycle.shutdown_all(timeout, "server shutting down")
        if left:
            self.log.warning("gstream: %d streams did not end within %.1f s", left, timeout)


class GeventWorker(_Draining, ggevent.GeventWorker):
    """``-k gevent`` plus a graceful end of SSE streams and WebSockets on SIGTERM,
    and fair keep-alive connections."""

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        # gunicorn's parser has checked the grammar; what it lets through
        # (no Host, a coding before chunked) httpcheck refuses here. HTTP/2
        # requests go through handle_http2_request, not here.
        if req.version < (2, 0):
            fields = [(name.encode("latin-1"), value.encode("latin-1"))
                      for name, value in req.headers]
            try:
                httpcheck.check_fields(fields, req.version)
            except InvalidRequest as exc:
                refuse(sock, addr, exc)
                raise StopIteration from None  # gunicorn's way to close the connection
        result = super().handle_request(listener_name, req, sock, addr)
        # The connection stays open (gunicorn raises StopIteration to close
        # it): let the others' ready requests run before reading its next.
        yield_to_ready_io()
        return result


class _FairPyWSGIHandler(FairKeepAlive, StrictRequests, ggevent.PyWSGIHandler):
    pass


class GeventPyWSGIWorker(_Draining, ggevent.GeventPyWSGIWorker):
    """``-k gevent_pywsgi`` plus a graceful end of SSE streams and WebSockets on SIGTERM,
    and fair keep-alive connections."""

    wsgi_handler = _FairPyWSGIHandler
