"""GStreamHandler: gevent's pywsgi handler with a clean connection hijack.

gevent's ``WSGIHandler`` has no notion of a connection that stops being
HTTP. This subclass adds one: it puts a ``gstream.hijack`` callable in the
environ, and once the application calls it the handler

- hands over the socket plus any bytes its reader had already buffered,
- writes nothing more on that connection (no status line, no chunk
  terminator, no error page) and closes it when the application returns,
- logs the request as a ``101`` instead of an error,
- drops its read buffer (8 KiB) and the request body reader, which a
  long-lived connection no longer needs.

It also bounds how long a client may take to send a request head
(:attr:`request_head_timeout`), which plain pywsgi does not: a client that
opens a connection and dribbles (or never sends) the headers is answered with
408 or disconnected instead of pinning a greenlet forever.

Use it with ``gevent.pywsgi.WSGIServer(addr, app, handler_class=GStreamHandler)``;
gstream's own server uses it by default.
"""

from __future__ import annotations

import io
import logging
import socket
from typing import Any

import gevent
from gevent.pywsgi import Input, WSGIHandler

from .hijack import drain_buffered

__all__ = ["GStreamHandler"]

log = logging.getLogger("gstream.handler")

_CLOSED_READER = io.BytesIO()
_CLOSED_READER.close()

_REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 16\r\n\r\nrequest timeout\n"
)


class _HeadTimeout(socket.timeout):
    """The request head did not arrive in time (an OSError, so pywsgi's
    request-line reader treats it as a dead connection)."""


class GStreamHandler(WSGIHandler):
    """A pywsgi handler that supports a clean hijack (see module docstring)."""

    #: Seconds a client may take to send a complete request line and headers
    #: (also the keep-alive idle limit between requests). None disables.
    request_head_timeout: float | None = 30.0

    _hijacked = False
    _head_timer: gevent.Timeout | None = None

    def handle_one_request(self) -> Any:
        if self.request_head_timeout is not None:
            self._head_timer = gevent.Timeout.start_new(
                self.request_head_timeout, _HeadTimeout("request head timeout"))
        try:
            return super().handle_one_request()
        finally:
            self._cancel_head_timer()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.close()
            self._head_timer = None

    def get_environ(self) -> dict[str, Any]:
        # The head has been parsed: the application may take as long as it likes.
        self._cancel_head_timer()
        env: dict[str, Any] = super().get_environ()
        self._hijacked = False
        env["gstream.hijack"] = self._hijack
        return env

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, _HeadTimeout):
            log.info("request head timeout from %s", self.client_address)
            self.close_connection = True
            return ("408", _REQUEST_TIMEOUT_RESPONSE)
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
        self._hijacked = True
        sock = self.socket
        pre = drain_buffered(getattr(self, "rfile", None), sock)
        # Free what a hijacked connection no longer needs and end keep-alive.
        self.rfile = _CLOSED_READER
        self.wsgi_input = Input(_CLOSED_READER, 0)
        env = getattr(self, "environ", None)
        if isinstance(env, dict):
            env["wsgi.input"] = io.BytesIO(b"")
            env.pop("gstream.hijack", None)
        self.close_connection = True
        self.status = b"101 Switching Protocols"
        self._orig_status = "101 Switching Protocols"
        self.headers_sent = True
        self.response_use_chunked = False
        return sock, pre

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
        super().process_result()

    def _send_error_response_if_possible(self, error_code: int) -> None:
        if self._hijacked:
            self.close_connection = True
            return
        super()._send_error_response_if_possible(error_code)
