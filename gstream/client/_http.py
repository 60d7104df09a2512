"""Small HTTP/1.1 pieces shared by the gevent-native clients.

Everything here uses :mod:`gevent.socket` directly, so the clients are
cooperative whether or not the process is monkey-patched. :mod:`ssl` is
imported only when a ``https``/``wss`` URL is used, so importing
:mod:`gstream` never imports :mod:`ssl` before ``gevent.monkey.patch_all()``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gevent import socket as gsocket

from ..errors import HTTPError

#: Longest response head (status line plus headers) a client accepts.
MAX_HEAD = 64 * 1024
#: Longest chunk-size line accepted in a chunked body.
MAX_CHUNK_LINE = 1024


def split_url(url: str, secure_schemes: tuple[str, ...], plain_schemes: tuple[str, ...]
              ) -> tuple[bool, str, int, str, str]:
    """Return (secure, host, port, target, host_header) for ``url``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in secure_schemes:
        secure = True
    elif scheme in plain_schemes:
        secure = False
    else:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in URL {url!r}")
    port = parts.port or (443 if secure else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = f"[{host}]" if ":" in host else host
    if parts.port:
        host_header += f":{parts.port}"
    return secure, host, port, target, host_header


def open_socket(host: str, port: int, *, secure: bool, timeout: float | None,
                ssl_context: Any = None) -> Any:
    """Open a (TLS-wrapped when ``secure``) gevent TCP socket."""
    sock = gsocket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        if secure:
            from gevent import ssl as gssl  # lazy: see module docstring

            ctx = ssl_context or gssl.create_default_context()
            sock = ctx.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return sock


def read_head(sock: Any, limit: int = MAX_HEAD) -> tuple[int, str, dict[str, str], bytes]:
    """Read a response head; return (status, reason, lower-cased headers, rest)."""
    buf = b""
    while True:
        idx = buf.find(b"\r\n\r\n")
        if idx >= 0:
            break
        if len(buf) > limit:
            raise HTTPError(0, f"response head longer than {limit} bytes")
        chunk = sock.recv(16384)
        if not chunk:
            raise ConnectionError("connection closed before the response head ended")
        buf += chunk
    head, rest = buf[:idx], buf[idx + 4:]
    lines = head.decode("latin-1").split("\r\n")
    status_parts = lines[0].split(" ", 2)
    if len(status_parts) < 2 or not status_parts[0].startswith("HTTP/") or not status_parts[1].isdigit():
        raise HTTPError(0, f"malformed status line {lines[0][:100]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(status_parts[1]), (status_parts[2] if len(status_parts) > 2 else ""), headers, rest


class ChunkedDecoder:
    """Incremental decoder of a ``Transfer-Encoding: chunked`` body."""

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0  # bytes of chunk payload still to come
        self._skip_crlf = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Decode ``data``; return the payload bytes it completed."""
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while pos < n and not self.done:
            if self._remaining:
                take = min(self._remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._skip_crlf = True
                continue
            if self._skip_crlf:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HTTPError(0, "malformed chunked body (missing CRLF)")
                pos += 2
                self._skip_crlf = False
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > MAX_CHUNK_LINE:
                    raise HTTPError(0, "chunk-size line too long")
                break
            size_field = buf[pos:end].split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise HTTPError(0, f"bad chunk size {size_field[:20]!r}") from None
            pos = end + 2
            if size == 0:
                self.done = True  # trailers are ignored
                break
            self._remaining = size
        self._buf = buf[pos:] if not self.done else b""
        return b"".join(out)
