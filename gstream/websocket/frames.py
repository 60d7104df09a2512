"""Unmasked server-to-client data frames, encoded once (RFC 6455, section 5.2).

The one piece of framing gstream does itself, because it is on every send and broadcast;
parsing stays with websockets. docs/websocket.md, "I/O model".
"""

from __future__ import annotations

import struct

from ..types import Message

__all__ = ["Message", "PreparedMessage", "encode_frame", "prepare"]


TEXT = 0x1
BINARY = 0x2
PING = 0x9
_FIN = 0x80

_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame of ``opcode`` carrying ``payload``.

    Control frames (``PING``) carry at most 125 bytes (RFC 6455, 5.5); the
    caller keeps to that.
    """
    n = len(payload)
    if n < 126:
        return bytes((_FIN | opcode, n)) + payload
    if n < 65536:
        return _HEAD16.pack(_FIN | opcode, 126, n) + payload
    return _HEAD64.pack(_FIN | opcode, 127, n) + payload


class PreparedMessage:
    """A message encoded once as an unmasked frame, to send to many connections.

    Every connection without an extension (no permessage-deflate) queues the
    very same ``frame`` bytes object; others fall back to encoding ``payload``.
    """

    __slots__ = ("payload", "is_text", "frame")

    def __init__(self, message: Message) -> None:
        if isinstance(message, str):
            self.payload = message.encode("utf-8")
            self.is_text = True
        else:
            self.payload = bytes(message)
            self.is_text = False
        self.frame: bytes = encode_frame(TEXT if self.is_text else BINARY, self.payload)


def prepare(message: Message) -> PreparedMessage:
    """Encode ``message`` (text if str, binary if bytes) once for a broadcast."""
    return PreparedMessage(message)
