"""Message reassembly: data frames in, whole messages out, UTF-8 validated incrementally.

Pure (no I/O, no gevent, no websockets): the connection hands it the payloads of the data
frames websockets parsed. A refused message raises :class:`MessageError` with its close code.
"""

from __future__ import annotations

import codecs
from typing import Any

from ..types import Message

__all__ = ["Assembler", "MessageError", "whole_message"]


class MessageError(Exception):
    """A message the connection must refuse, with the close code to fail it with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def whole_message(data: Any, is_text: bool, limit: int) -> Message:
    """The message of one final, unfragmented frame (the common case: no decoder, no list).

    Raises :class:`MessageError` 1009 above ``limit`` bytes, 1007 for text that is not UTF-8.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > limit:  # websockets enforces max_size too; this keeps the code ours
        raise MessageError(1009, "message too big")
    if not is_text:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(1007, "invalid UTF-8") from None


class Assembler:
    """One fragmented message being put back together.

    Made when the first fragment arrives and dropped with the last, so an idle connection
    holds none. Text is decoded fragment by fragment, so invalid UTF-8 fails the message as
    soon as it is seen (RFC 6455 8.1, "fail fast"), not at the end.
    """

    __slots__ = ("parts", "size", "decoder", "limit")

    def __init__(self, is_text: bool, limit: int) -> None:
        self.parts: list[Any] = []
        self.size = 0
        self.limit = limit
        self.decoder = codecs.getincrementaldecoder("utf-8")() if is_text else None

    def add(self, data: Any, fin: bool) -> Message | None:
        """Take one fragment; return the whole message after the last one (``fin``), else None.

        Raises :class:`MessageError` 1009 once the message exceeds ``limit`` bytes, 1007 at
        the first invalid UTF-8 sequence of a text message.
        """
        self.size += len(data)
        if self.size > self.limit:
            raise MessageError(1009, "message too big")
        if self.decoder is not None:
            try:
                self.parts.append(self.decoder.decode(data, fin))
            except UnicodeDecodeError:
                raise MessageError(1007, "invalid UTF-8") from None
        else:
            self.parts.append(data)
        if not fin:
            return None
        parts = self.parts
        if self.decoder is not None:
            return parts[0] if len(parts) == 1 else "".join(parts)
        return parts[0] if len(parts) == 1 else b"".join(parts)
