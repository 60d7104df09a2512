"""Unmasked server-to-client data frames, encoded once (RFC 6455, section 5.2).

The one piece of framing gstream does itself, because it is on every send and broadcast;
parsing stays with websockets. docs/websocket.md, "I/O model".
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Sequence

from ..types import Message

__all__ = ["Message", "PreparedMessage", "PreparedRun", "encode_frame", "prepare", "prepare_run"]


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


class PreparedRun(bytes):
    """The frames of several prepared messages joined into one ``bytes`` object.

    A hub queues the *same* run on every member that takes all of its
    messages (:meth:`~gstream.websocket.WebSocket.push_shared_run`): one
    call and one queued object per member and batch instead of one per
    message. ``messages`` is the number of messages whose frames are (wholly or
    partly) in these bytes; a connection's queue counts them against
    ``send_buffer``. A run is one object per batch, shared by every member,
    so its attribute dictionary (a ``bytes`` subclass cannot have slots)
    costs nothing per member (docs/hub.md).

    ``ends`` holds the end offsets of the frames in the original run and
    ``base`` this object's start in it: the pieces :meth:`tail` and
    :meth:`without_first` cut keep exact message counts.
    """

    messages: int
    ends: tuple[int, ...]
    base: int

    @classmethod
    def _cut(cls, data: bytes, ends: tuple[int, ...], base: int) -> PreparedRun:
        run = cls(data)
        run.ends = ends
        run.base = base
        # Frames that end at or before ``base`` are gone; one cut in the
        # middle still counts (as a lone partly sent frame does).
        run.messages = len(ends) - bisect_right(ends, base)
        return run

    def tail(self, n: int) -> PreparedRun:
        """What is left after the first ``n`` bytes were sent (0 < n < len)."""
        return self._cut(self[n:], self.ends, self.base + n)

    def split_first(self) -> tuple[PreparedRun, PreparedRun]:
        """(this run's first message, the others) for a run of two or more
        messages; the first may be partly sent."""
        first = len(self.ends) - self.messages
        cut = self.ends[first]
        return (self._cut(self[:cut - self.base], self.ends[:first + 1], self.base),
                self._cut(self[cut - self.base:], self.ends, cut))

    def without_first(self, k: int) -> PreparedRun:
        """This run without its first ``k`` messages (0 < k < messages).

        Only for a run that starts on a frame boundary (one not partly sent).
        """
        first = len(self.ends) - self.messages  # index of this run's first frame
        cut = self.ends[first + k - 1]
        return self._cut(self[cut - self.base:], self.ends, cut)


def prepare_run(prepared: Sequence[PreparedMessage]) -> PreparedRun:
    """Join the frames of ``prepared`` (at least one message) into one :class:`PreparedRun`."""
    if not prepared:
        raise ValueError("prepare_run() needs at least one message")
    ends = []
    size = 0
    for pm in prepared:
        size += len(pm.frame)
        ends.append(size)
    return PreparedRun._cut(b"".join([pm.frame for pm in prepared]), tuple(ends), 0)
