"""GStreamHandler: gevent's pywsgi handler with a clean connection hijack.

The application takes the socket through ``environ["gstream.hijack"]``; the
handler then writes nothing more and logs a 101. It also keeps long streams
cheap (one ``send`` for head and first chunk, the read buffer released while
a stream runs), and brings the mixins every gstream server handler carries:
fair keep-alive, the request-head deadline, strict heads, departure watch.
Use it with ``WSGIServer(addr, app, handler_class=GStreamHandler)``; gstream's
own server uses it by default. Why each part is there: docs/server.md
("GStreamHandler").
"""

from __future__ import annotations

import _socket
import logging
from collections.abc import Callable
from typing import Any

from gevent.pywsgi import WSGIHandler
from gevent.socket import socket as GeventSocket

from .accessline import AccessLine
from .deadline import HeadDeadline
from .departure import DepartureWatching, has_buffered
from .fairness import FairKeepAlive
from .hijack import CLOSED_READER, SWITCHED_READER, drain_buffered, empty_input, mark_switched
from .proxy import ProxyHeaders
from .strict import StrictRequests
from .tlsio import is_tls

__all__ = ["GStreamHandler"]

log = logging.getLogger("gstream.handler")

# The shared, empty request body of every connection whose reader was
# released (gstream.hijack.empty_input), also left in the environ a WebSocket keeps.
_EMPTY_INPUT = empty_input()
# Above this, a first body chunk is sent on its own rather than copied after
# the headers (the copy would cost more than the saved syscall).
_MERGE_LIMIT = 16384
# Environ keys kept for error logs once a stream has given its environ back.
_LOG_KEYS = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "REMOTE_PORT",
             "SERVER_PROTOCOL", "HTTP_HOST", "HTTP_USER_AGENT")

# Why the handler's state lives in sentinels and locals rather than in new
# attributes: CPython 3.11+ keeps up to 29 distinct instance attributes of a
# class inline; past that every handler carries a full dict (docs/server.md,
# "GStreamHandler"; sizes in docs/performance.md). pywsgi sets 27 on a
# streaming request and HeadDeadline one (_head_timer): one is left.
# The order pywsgi first sets them in a streaming request; see _prime_layout.
_LAYOUT = (
    "socket", "client_address", "server", "rfile", "time_start", "time_finish", "_head_timer",
    "requestline", "response_length", "command", "path",
    "request_version", "headers", "content_length", "close_connection", "wsgi_input",
    "environ", "application", "status", "headers_sent", "result", "response_use_chunked",
    "connection_upgraded", "_orig_status", "response_headers", "code", "provided_date",
    "provided_content_length",
)


class GStreamHandler(AccessLine, FairKeepAlive, HeadDeadline, StrictRequests, DepartureWatching, WSGIHandler):
    """A pywsgi handler that supports a clean hijack (see module docstring)."""

    #: Honour proxy headers from these peers (see :mod:`gstream.proxy`);
    #: None (the default) ignores them. A class attribute: set it on a subclass.
    proxy_headers: ProxyHeaders | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _prime_layout(cls)  # before the subclass has any instance

    @property
    def _hijacked(self) -> bool:
        # (gstream.hijack.is_switched, inlined: this runs for every write.)
        return self.rfile is SWITCHED_READER

    def get_environ(self) -> dict[str, Any]:
        # (HeadDeadline's ends the request-head deadline.)
        env: dict[str, Any] = super().get_environ()
        env["gstream.hijack"] = self._hijack
        if self.proxy_headers is not None:
            self.proxy_headers.apply(env)
        return env

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, ConnectionError):
            # Reset mid-head: pywsgi would log a traceback, then answer 400
            # into the dead socket and die with an unhandled BrokenPipeError.
            log.debug("connection lost in the request head from %s: %s", self.client_address, ex)
            self.close_connection = True
            return None
        return super()._handle_client_error(ex)

    def _hijack(self) -> tuple[Any, bytes]:
        """Give the socket to the caller; return it with any read-ahead bytes."""
        if self._hijacked:
            raise RuntimeError("connection already hijacked")
        if getattr(self, "headers_sent", False):
            raise RuntimeError("cannot hijack after the response has started")
        sock = self.socket
        pre = drain_buffered(getattr(self, "rfile", None), sock)
        # Free what a hijacked connection no longer needs and end keep-alive;
        # the reader becomes the "hijacked" mark (_hijacked).
        env = getattr(self, "environ", None)
        mark_switched(self, env)
        _drop_attribute(self, "headers")  # the parsed request; environ has it all
        if isinstance(env, dict):
            env.pop("gstream.hijack", None)
        return sock, pre

    def detach(self) -> tuple[Any, Callable[[], None]] | None:
        """After a hijack, let the connection outlive this handler's greenlet.

        The descriptor moves to a new socket object, so the server's close
        at the end of this greenlet closes nothing. Only a server that keeps
        accounting for such sessions (gstream's :class:`~gstream.server.Server`,
        through ``claim_detached``) allows it: the session keeps a seat
        under ``max_connections`` until the returned release is called.
        Returns None (stay attached) anywhere else or while draining.
        """
        claim = getattr(self.server, "claim_detached", None)
        if not self._hijacked or claim is None or is_tls(self.socket):
            return None  # a TLS socket's state cannot move to a new socket object
        release = claim()
        if release is None:
            return None
        old = self.socket
        family, kind, proto = old.family, old.type, old.proto
        # A plain OS socket, not a gevent one: the session reads and writes
        # through its own watcher, and a gevent socket would carry two more
        # libev watchers per idle connection.
        sock = _socket.socket(family, kind, proto, fileno=old.detach())
        sock.setblocking(False)
        return sock, release

    # pywsgi's writes all go through these; after a hijack they must not.
    def write(self, data: bytes) -> None:
        if self._hijacked:
            return
        super().write(data)

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        if self._hijacked:
            # A framework answering after the hijack (Flask returning a view's
            # value): swallow it, the wire belongs to the WebSocket.
            return self.write
        return super().start_response(status, headers, exc_info)

    def process_result(self) -> None:
        if self._hijacked:
            # Consume nothing and write nothing; run_application closes the result.
            return
        if hasattr(self.result, "__len__"):
            super().process_result()  # a sized body: pywsgi sets Content-Length
            return
        # A streaming body (generator, SSE stream): maybe long-lived, so give
        # back what it does not need once its headers are out.
        checked = released = False  # locals, not attributes: see _LAYOUT
        try:
            for data in self.result:
                if data:
                    self.write(data)
                    if not checked and self.headers_sent:
                        checked = True
                        released = self._release_request()
            if self.status and not self.headers_sent:
                self.write(b"")
            if self.response_use_chunked:
                self._sendall(b"0\r\n\r\n")
        finally:
            if released:
                self._restore_reader()

    def _release_request(self) -> bool:
        """Free the read buffer and parsed request of a streaming response.

        Only when the request has no body (so nothing will be read until the
        response ends) and the reader holds no pipelined bytes (which would
        be lost). Returns True if released; undone by :meth:`_restore_reader`.
        """
        wsgi_input = self.wsgi_input
        if wsgi_input is None or wsgi_input.content_length or wsgi_input.chunked_input:
            return False
        rfile = self.rfile
        if rfile is CLOSED_READER or getattr(rfile, "closed", True):
            return False
        if has_buffered(rfile, self.socket):
            return False
        self.rfile = CLOSED_READER
        self.wsgi_input = _EMPTY_INPUT
        env: Any = getattr(self, "environ", None)
        if isinstance(env, dict) and env.get("wsgi.input") is wsgi_input:
            env["wsgi.input"] = _EMPTY_INPUT
        # The class attribute (an empty message) stands in for the parsed
        # headers; the encoded response headers were sent already.
        # (``del``, not ``__dict__.pop``: touching __dict__ would turn the
        # compact inline attributes into a full dict for good.)
        _drop_attribute(self, "headers")
        _drop_attribute(self, "response_headers")
        if isinstance(env, dict):
            # The application has its environ; ours only serves error logs.
            self.environ = {k: env[k] for k in _LOG_KEYS if k in env}
        return True

    def _restore_reader(self) -> None:
        # The stream is over; if the connection is kept alive, the next
        # request needs a real reader again.
        if self.socket is not None:
            try:
                self.rfile = self.socket.makefile("rb", -1)
            except OSError:
                pass  # closed under us: the keep-alive loop ends on rfile.closed

    def _sendall(self, data: Any) -> None:
        # gevent's sendall asks the kernel for SO_SNDBUF and slices a
        # memoryview on every call; a stream's writes are small and nearly
        # always fit the socket buffer, so try one plain non-blocking send
        # first (plain TCP only: a TLS socket's _sock is not the TLS layer)
        # and hand only a remainder to pywsgi/gevent.
        sock = self.socket
        if type(sock) is not GeventSocket:
            super()._sendall(data)
            return
        try:
            sent = sock._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            super()._sendall(data)  # fails again, and is recorded the pywsgi way
            return
        self.response_length += sent
        if sent < len(data):
            super()._sendall(memoryview(data)[sent:])

    def _write(self, data: bytes, _bytearray: Any = bytearray) -> None:
        # pywsgi grows a bytearray (header, data, trailer): two copies of
        # ``data``. One join is one copy, and this runs once per event.
        if not data:
            return
        if self.response_use_chunked:
            self._sendall(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            self._sendall(data)

    def _write_with_headers(self, data: bytes) -> None:
        # pywsgi sends the head and the first chunk in two writes; one write
        # saves a syscall per response and never waits on Nagle.
        self.headers_sent = True
        self.finalize_headers()
        parts = [b"HTTP/1.1 ", self.status, b"\r\n"]
        for header, value in self.response_headers:
            parts += (header, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        if data and len(data) <= _MERGE_LIMIT:
            if self.response_use_chunked:
                parts += (b"%x\r\n" % len(data), data, b"\r\n")
            else:
                parts.append(data)
            self._sendall(b"".join(parts))
        else:
            self._sendall(b"".join(parts))
            self._write(data)
        self.watch_departure()  # DepartureWatching's hook: the head is out

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self._hijacked:
            self.close_connection = True
            return
        super()._send_error_response_if_possible(error_code)


def _drop_attribute(obj: Any, name: str) -> None:
    # The class attribute (pywsgi's empty default) shows through again.
    try:
        delattr(obj, name)
    except AttributeError:
        pass


def _prime_layout(cls: type) -> None:
    """Give ``cls`` its full instance-attribute layout before it has instances.

    CPython 3.11+ stores instance attributes inline, in a table of names
    shared by the class, which can only grow a little with each new
    instance. Handlers are created many at a time (a burst of connections)
    and learn their attributes slowly (the request line, then headers, then
    the response), so the table fills up half-way and every later handler
    falls back to a full dict (docs/performance.md). One throwaway
    instance that sets every name, in order, before any real one exists
    (so: when the class is created) avoids that. Harmless elsewhere.
    """
    probe: Any = object.__new__(cls)
    for name in _LAYOUT:
        object.__setattr__(probe, name, None)
    del probe


_prime_layout(GStreamHandler)
