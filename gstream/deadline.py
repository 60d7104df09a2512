"""The request-head deadline for pywsgi handlers, against slowloris clients.

Plain pywsgi waits for a request head forever. :class:`HeadDeadline` bounds
the time from "waiting for a request" to "head complete": a client that sent
part of a head gets ``408`` and one log line, an idle connection (nothing
sent, or idle between keep-alive requests) is closed. gstream's
:class:`~gstream.server.Server` sets the limit from its ``header_timeout``
(docs/server.md, "Request-head deadline").
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import gevent

__all__ = ["HeadDeadline", "HeadTimeout", "REQUEST_TIMEOUT_RESPONSE"]

log = logging.getLogger("gstream.handler")

#: The whole ``408`` response (RFC 9110 15.5.9), with ``Connection: close``.
REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 16\r\n\r\nrequest timeout\n"
)


class HeadTimeout(socket.timeout):
    """The request head did not arrive in time.

    An :class:`OSError`, so that pywsgi's request-line reader treats it as a
    connection that went quiet (closed without an answer), while its header
    reader hands it to ``_handle_client_error`` (answered ``408``).
    """


class HeadDeadline:
    """Mixin for a ``gevent.pywsgi.WSGIHandler`` subclass: bound the request head.

    Put it before ``WSGIHandler`` among the bases. Its one instance
    attribute is listed in ``_LAYOUT`` (gstream/handler.py).
    """

    #: Seconds a client may take to send a complete request line and headers
    #: (also the keep-alive idle limit between requests). None or 0 disables.
    request_head_timeout: float | None = 30.0

    client_address: Any
    close_connection: bool
    _head_timer: gevent.Timeout | None = None

    def handle_one_request(self) -> Any:
        """pywsgi's, with the deadline armed until the head is complete."""
        seconds = self.request_head_timeout
        expired = None
        if seconds:
            expired = HeadTimeout("request head timeout")
            self._head_timer = gevent.Timeout.start_new(seconds, expired)
        try:
            return super().handle_one_request()  # type: ignore[misc]
        except HeadTimeout as exc:
            # Fired outside pywsgi's readers (in a keep-alive pass, say): the
            # connection is idle, close it like pywsgi's request-line reader does.
            if exc is not expired:
                raise
            self.close_connection = True
            return None
        finally:
            self.end_head_deadline()

    def end_head_deadline(self) -> None:
        """Disarm the deadline (the head is complete; the application is never timed)."""
        timer = self._head_timer
        if timer is not None:
            timer.close()
            self._head_timer = None  # a long stream need not keep it

    def get_environ(self) -> Any:
        """pywsgi's, once the head is complete: the deadline ends here."""
        self.end_head_deadline()
        return super().get_environ()  # type: ignore[misc]

    def _handle_client_error(self, ex: BaseException) -> Any:
        # pywsgi's hook for errors while reading the headers.
        if isinstance(ex, HeadTimeout):
            log.info("request head timeout from %s", self.client_address)
            self.close_connection = True
            return ("408", REQUEST_TIMEOUT_RESPONSE)
        return super()._handle_client_error(ex)  # type: ignore[misc]
