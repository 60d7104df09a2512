"""Non-blocking reads and writes on a TLS socket with plain-socket semantics.

A WebSocket connection reads from a libev watcher callback and writes with
non-blocking sends (see docs/websocket.md). On plain TCP that is the OS
socket itself; over TLS (``Server(certfile=...)``, wss://) it must be the TLS
layer, with two differences handled here: a read that finds only part of a
record raises ``SSLWantReadError`` (we say ``BlockingIOError``, as a plain
socket would), and decrypted bytes can stay buffered inside the TLS object
where the descriptor's readiness never reports them, so every read drains
them too (a record larger than one read, or OpenSSL read-ahead). Writes are never joined by the caller over TLS, so a write that
could not complete is retried with the very same buffer, as OpenSSL requires.
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
