"""gunicorn's gevent workers with gstream's graceful shutdown, fair keep-alive and departure watch::

    gunicorn -k gstream.contrib.gunicorn.GeventWorker -w 4 myapp:app
    gunicorn -k gstream.contrib.gunicorn.GeventPyWSGIWorker -w 4 myapp:app

Both refuse malformed request heads as gstream's server does (RFC 9112;
docs/security.md): ``GeventPyWSGIWorker`` through :mod:`gstream.strict`,
``GeventWorker`` by checking what gunicorn's own parser lets through.

They also keep keep-alive connections fair, as ``GStreamHandler`` does.

On SIGTERM they end live streams politely (SSE: a final event and ``retry:``;
WebSocket: 1001) instead of letting gunicorn kill them at ``--graceful-timeout``.
Why and how (fairness, proxy headers, departed clients): docs/demo.md ("gunicorn")
and docs/deploy.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gunicorn.workers import ggevent

from .. import departure, httpcheck
from ..errors import ClientDeparted, InvalidRequest
from ..fairness import FairKeepAlive, yield_to_ready_io
from ..lifecycle import lifecycle
from ..proxy import ProxyHeaders
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

    wsgi: Any

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = _WatchStreams(self.wsgi)

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
        if _request_done(req):
            departure.prepare(sock)  # armed by _WatchStreams once a stream starts
        try:
            result = super().handle_request(listener_name, req, sock, addr)
        except ClientDeparted as exc:
            # gunicorn's way to close the connection; it logs one debug line.
            raise StopIteration(f"{exc} during {req.method} {req.path}") from None
        finally:
            departure.unwatch()
        # The connection stays open (gunicorn raises StopIteration to close
        # it): let the others' ready requests run before reading its next.
        yield_to_ready_io()
        return result


def _request_done(req: Any) -> bool:
    """True if nothing of ``req``'s connection is read until its response ends:
    no body, and no next request already in gunicorn's read-ahead buffer."""
    for name, value in req.headers:
        if name == "TRANSFER-ENCODING" or (name == "CONTENT-LENGTH" and value.strip() != "0"):
            return False
    return not departure.read_ahead(getattr(getattr(req, "unreader", None), "buf", None))


class _WatchStreams:
    """The worker's WSGI app, wrapped: arms the departure watch of a streaming response.

    A response is a stream when it sets no ``Content-Length`` and its body
    has no ``len`` (iterator form: armed when the application returns it) or
    it is written through ``write`` (armed after the first write).
    """

    __slots__ = ("app",)

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        starter = _StartResponse(start_response)
        result = self.app(environ, starter)
        if (not starter.sized and not hasattr(result, "__len__")
                and not isinstance(result, environ.get("wsgi.file_wrapper", ()))):
            departure.arm()
        return result


class _StartResponse:
    """``start_response`` noting whether the response is sized; its ``write`` arms the watch."""

    __slots__ = ("start_response", "sized", "_write")

    def __init__(self, start_response: Callable[..., Any]) -> None:
        self.start_response = start_response
        self.sized = False

    def __call__(self, status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], Any]:
        self.sized = any(name.lower() == "content-length" for name, _ in headers)
        self._write = self.start_response(status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> None:
        """The WSGI ``write`` callable: gunicorn's, then the watch is armed."""
        self._write(data)
        if not self.sized:
            departure.arm()


class _FairPyWSGIHandler(FairKeepAlive, StrictRequests, departure.DepartureWatching,
                        ggevent.PyWSGIHandler):
    # Set per worker from gunicorn's configuration (GeventPyWSGIWorker.init_process).
    trusted_proxies: ProxyHeaders | None = None
    secure_scheme_headers: dict[str, str] = {}

    def _forwarded_scheme(self) -> str | None:
        """gunicorn's rule: each secure-scheme header a trusted peer sent says
        https (its expected value) or http (anything else); they must agree."""
        trusted = self.trusted_proxies
        address = self.client_address
        peer = str(address[0]) if isinstance(address, tuple) else ""  # "": a Unix socket
        if trusted is None or not trusted.trusts(peer):
            return None
        scheme = None
        for name, expected in self.secure_scheme_headers.items():
            for value in self.headers.get_all(name) or ():
                this = "https" if value.strip() == expected else "http"
                if scheme is not None and this != scheme:
                    # As gunicorn's parser: pywsgi answers a ValueError with 400.
                    raise ValueError("Contradictory scheme headers")
                scheme = this
        return scheme

    def read_request(self, raw_requestline: str) -> Any:
        result = super().read_request(raw_requestline)
        if result:
            self._forwarded_scheme()  # refuse contradicting headers before the app runs
        return result

    def get_environ(self) -> Any:
        env = super().get_environ()
        scheme = self._forwarded_scheme()
        if scheme is not None:
            env["wsgi.url_scheme"] = scheme
        return env


class GeventPyWSGIWorker(_Draining, ggevent.GeventPyWSGIWorker):
    """``-k gevent_pywsgi`` plus a graceful end of SSE streams and WebSockets on SIGTERM,
    and fair keep-alive connections."""

    wsgi_handler = _FairPyWSGIHandler

    def init_process(self) -> None:
        # The handler learns gunicorn's proxy settings before run() builds the servers.
        cfg = self.cfg

        class PyWSGIHandler(_FairPyWSGIHandler):
            trusted_proxies = ProxyHeaders(cfg.forwarded_allow_ips)
            secure_scheme_headers = dict(cfg.secure_scheme_headers)

        self.wsgi_handler = PyWSGIHandler
        super().init_process()
