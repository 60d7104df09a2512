"""Strict request heads for pywsgi handlers: :mod:`gstream.httpcheck` at the seam.

:class:`StrictRequests` checks the raw request line and header lines as pywsgi
reads them, before its ``http.client`` parse can lose anything and before the
application runs; a refused request gets its status (400, 431, 501 or 505),
one log line and a closed connection. The rules: docs/security.md.
"""

from __future__ import annotations

import http.client
import logging
from typing import Any

from . import httpcheck
from .errors import InvalidRequest

__all__ = ["StrictRequests", "refuse"]

log = logging.getLogger("gstream.http")


class _LineRecorder:
    """A reader for http.client that keeps every raw line it hands out."""

    __slots__ = ("_fp", "lines")

    def __init__(self, fp: Any) -> None:
        self._fp = fp
        self.lines: list[bytes] = []

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self._fp.readline(size)
        self.lines.append(line)
        return line


class StrictRequests:
    """Mixin for a ``gevent.pywsgi.WSGIHandler`` subclass: refuse malformed heads.

    Put it before ``WSGIHandler`` (or a subclass of it) among the bases. It
    adds no instance attribute (see ``_LAYOUT`` in gstream/handler.py).
    """

    client_address: Any
    close_connection: bool
    request_version: str
    socket: Any

    def read_requestline(self) -> str:
        """pywsgi's, skipping one empty line before the request line (RFC 9112 2.2)."""
        line: str = super().read_requestline()  # type: ignore[misc]
        if line in ("\r\n", "\n"):
            line = super().read_requestline()  # type: ignore[misc]
        return line

    def read_request(self, raw_requestline: str) -> Any:
        """Check the request line, then let pywsgi parse it (it calls :meth:`MessageClass`)."""
        # pywsgi decoded the bytes as latin-1: encoding gives them back unchanged.
        httpcheck.check_request_line(raw_requestline.encode("latin-1"))
        return super().read_request(raw_requestline)  # type: ignore[misc]

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # noqa: N802 (pywsgi's name)
        """pywsgi's header parser, with the raw lines it read checked by httpcheck."""
        recorder = _LineRecorder(fp)
        try:
            message = super().MessageClass(recorder, *args)  # type: ignore[misc]
        except http.client.HTTPException as exc:  # "got more than 100 headers"
            raise httpcheck.head_too_large(str(exc)) from None
        if getattr(message, "status", ""):
            # pywsgi's parser caught http.client.LineTooLong: a line past
            # 64 KiB, or (under gstream's Server) the whole head too long.
            raise httpcheck.head_too_large("line too long")
        # "HTTP/d.d": read_request checked the line before pywsgi set it.
        version = self.request_version
        httpcheck.check_headers(recorder.lines, (int(version[5]), int(version[7])))
        return message

    def _handle_client_error(self, ex: BaseException) -> Any:
        # pywsgi's hook for bad client input (it would answer 400 whatever the
        # reason). Answer here, where a peer already gone is not an error.
        if not isinstance(ex, InvalidRequest):
            return super()._handle_client_error(ex)  # type: ignore[misc]
        self.close_connection = True
        refuse(self.socket, self.client_address, ex)
        return None  # pywsgi's loop ends and closes the connection


def refuse(sock: Any, client: Any, exc: InvalidRequest) -> None:
    """Log the refusal (one line) and send its response on ``sock``; the caller closes."""
    log.info("refused request from %s: %d %s (%s)", client, exc.status, exc.reason, exc.rule)
    try:
        sock.sendall(httpcheck.error_response(exc))
    except OSError:
        pass  # the client left: nothing to tell it
