"""A deliberately dumb raw-socket WebSocket client for hostile-input tests.

It builds frames byte by byte (so it can build wrong ones) and reads the
server's frames without validating them.
"""

from __future__ import annotations

import base64
import os
import socket
import struct

import gevent

from tests.helpers import read_response_head

KEY = base64.b64encode(b"0123456789abcdef").decode()


def handshake(port: int, path: str = "/", headers: dict[str, str] | None = None,
              extra: bytes = b"", timeout: float = 5.0, method: str = "GET",
              source: str | None = None, protocol: str = "HTTP/1.1",
              ) -> tuple[socket.socket, int, dict[str, str], bytes]:
    """Send an upgrade request (plus ``extra`` bytes in the same write),
    from the loopback address ``source`` if given."""
    h = {"Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
         "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}
    h.update(headers or {})
    req = f"{method} {path} {protocol}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in h.items() if v is not None) + "\r\n"
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                 source_address=(source, 0) if source else None)
    s.sendall(req.encode("latin-1") + extra)
    status, headers_out, rest = read_response_head(s)
    return s, status, headers_out, rest


def frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bool = True,
          rsv: int = 0, length: int | None = None) -> bytes:
    """Encode one client frame; ``length`` overrides the declared length."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, (0x80 if mask else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", b0, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + masked


def text(s: str | bytes, fin: bool = True) -> bytes:
    return frame(0x1, s.encode() if isinstance(s, str) else s, fin=fin)


def close_frame(code: int | None = None, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(0x8, payload)


class Reader:
    """Read server frames from a socket (server frames are never masked)."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = initial

    def _need(self, n: int) -> bool:
        while len(self.buf) < n:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError, OSError):
                return False
            if not data:
                return False
            self.buf += data
        return True

    def next(self, timeout: float = 5.0) -> tuple[int, bytes, bool] | None:
        """(opcode, payload, fin), or None at EOF."""
        with gevent.Timeout(timeout):
            if not self._need(2):
                return None
            b0, b1 = self.buf[0], self.buf[1]
            n = b1 & 0x7F
            off = 2
            if n == 126:
                if not self._need(4):
                    return None
                n = struct.unpack("!H", self.buf[2:4])[0]
                off = 4
            elif n == 127:
                if not self._need(10):
                    return None
                n = struct.unpack("!Q", self.buf[2:10])[0]
                off = 10
            if not self._need(off + n):
                return None
            payload = self.buf[off:off + n]
            self.buf = self.buf[off + n:]
            return b0 & 0x0F, payload, bool(b0 & 0x80)

    def until_close(self, timeout: float = 5.0) -> tuple[int | None, bytes]:
        """Skip data frames; return the close (code, reason); (None, b'EOF') at EOF."""
        with gevent.Timeout(timeout):
            while True:
                f = self.next(timeout)
                if f is None:
                    return None, b"EOF"
                op, payload, _ = f
                if op == 0x8:
                    if len(payload) >= 2:
                        return struct.unpack("!H", payload[:2])[0], payload[2:]
                    return 1005, b""

    def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server closed the TCP connection (after any frames)."""
        with gevent.Timeout(timeout):
            while True:
                try:
                    data = self.sock.recv(65536)
                except (ConnectionResetError, OSError):
                    return True
                if not data:
                    return True
