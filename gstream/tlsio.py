"""Non-blocking reads and writes on a TLS socket with plain-socket semantics.

The WebSocket I/O model (read from a libev callback, non-blocking sends) over
TLS: partial records read as ``BlockingIOError``, buffered decrypted bytes are
drained, an incomplete write is retried with the same buffer (docs/websocket.md, "TLS").
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["is_tls", "TLSTransport", "os_socket", "tls_would_block"]


def is_tls(sock: Any) -> bool:
    """True for an ``ssl``/gevent TLS socket (checked without importing ``ssl``,
    which must not be loaded before the application monkey-patches)."""
    return hasattr(sock, "_sslobj") and hasattr(sock, "pending")


def tls_would_block(exc: BaseException) -> bool:
    """True for TLS "no complete record yet" (``SSLWantReadError``/``SSLWantWriteError``).

    Looked up in ``sys.modules``: if ``ssl`` is not loaded, no TLS socket exists.
    """
    ssl = sys.modules.get("ssl")
    return ssl is not None and isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError))


def os_socket(sock: Any) -> Any:
    """The OS-level socket under a gevent (TLS) socket: shutting it down leaves
    the TLS object in place (gevent's TLS ``shutdown`` discards it)."""
    return getattr(sock, "_sock", sock)


class TLSTransport:
    """``send``/``recv`` over a gevent TLS socket that never block."""

    __slots__ = ("sock",)

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        sock.settimeout(0.0)  # gevent then raises / returns 0 instead of waiting

    def send(self, data: bytes) -> int:
        """Bytes written (all of ``data``, or 0 when the kernel buffer is full)."""
        return int(self.sock.send(data))

    def recv(self, size: int) -> bytes:
        """What the TLS layer has decrypted (b"" at EOF); ``BlockingIOError`` if nothing yet."""
        try:
            data: bytes = self.sock.recv(size)
            pending = self.sock.pending()
            if not pending or not data:
                return data
            parts = [data]
            while pending:
                parts.append(self.sock.recv(pending))
                pending = self.sock.pending()
            return b"".join(parts)
        except OSError as exc:
            if tls_would_block(exc):
                raise BlockingIOError("TLS record incomplete") from None
            raise
