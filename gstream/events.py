"""The Server-Sent Events wire format: events and their encoding (WHATWG "event stream").

Pure: no I/O, nothing from gevent, so it can be used and fuzzed anywhere. Every
frame is encoded to ``bytes`` once, for any number of sockets. The injection
rules (truncate single-line fields, scrub and split data) are in docs/design.md.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EventType",
    "Event",
    "encode",
    "encode_comment",
    "encode_retry",
    "json_event",
    "truncate_field",
]

_FIELD_BREAKERS = ("\r", "\n", "\0")


class EventType(enum.IntEnum):
    """The kind of an :class:`Event`; it decides the ``event:`` line."""

    MESSAGE = 0
    """A plain message: no ``event:`` line (browsers default to ``message``)."""
    ERROR = 1
    """An ``event: error`` frame."""
    DONE = 2
    """An ``event: done`` frame, conventionally the last of a stream."""
    CUSTOM = 3
    """An event named by :attr:`Event.name`."""

    def __str__(self) -> str:
        return self.name.lower()


def truncate_field(value: str) -> str:
    """Return ``value`` cut at its first CR, LF or NUL.

    Used for every single-line field (ids, event names, comments) so that a
    hostile value can never start a new field or a new event.
    """
    cut = len(value)
    for ch in _FIELD_BREAKERS:
        i = value.find(ch, 0, cut)
        if i != -1:
            cut = i
    return value[:cut]


def _scrub_text(value: str) -> str:
    # Lone surrogates cannot be encoded as UTF-8; replace them instead of
    # raising in the middle of a publish to thousands of subscribers.
    return value.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(value) else value


def _has_surrogate(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event.

    Args:
        data: the payload. ``bytes`` are decoded as UTF-8 (invalid sequences
            replaced); newlines split it into several ``data:`` lines.
        type: the :class:`EventType`; defaults to a plain message.
        name: the event name, used when ``type`` is :attr:`EventType.CUSTOM`.
            A name given with the default type makes the event custom.
        id: the optional event id, echoed back by browsers as
            ``Last-Event-ID`` when they reconnect.
        retry: an optional reconnection delay in milliseconds (``retry:``);
            non-positive values are dropped because ``retry: 0`` makes
            clients reconnect in a tight loop.
    """

    data: str = ""
    type: EventType = EventType.MESSAGE
    name: str = ""
    id: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            object.__setattr__(self, "data", bytes(self.data).decode("utf-8", "replace"))
        elif not isinstance(self.data, str):
            raise TypeError(f"Event.data must be str or bytes, not {type(self.data).__name__}")
        if not isinstance(self.type, EventType):
            object.__setattr__(self, "type", EventType(self.type))
        if self.name and self.type is EventType.MESSAGE:
            object.__setattr__(self, "type", EventType.CUSTOM)
        if self.id is not None and not isinstance(self.id, str):
            object.__setattr__(self, "id", str(self.id))

    @property
    def event_name(self) -> str:
        """The name a client's ``EventSource`` dispatches this event under."""
        if self.type is EventType.CUSTOM:
            return truncate_field(self.name) or "message"
        if self.type is EventType.MESSAGE:
            return "message"
        return str(self.type)

    def encode(self) -> bytes:
        """Return this event as one wire frame (same as :func:`encode`)."""
        return encode(self)


def encode(event: Event) -> bytes:
    """Encode ``event`` as one complete SSE frame, as UTF-8 bytes.

    Fields are emitted in the order ``id``, ``event``, ``retry``, ``data``
    and the frame ends with a blank line. An id or name that is empty after
    truncation produces no line at all (an empty ``id:`` line would reset the
    client's last event id).
    """
    parts: list[str] = []
    if event.id is not None:
        ident = truncate_field(_scrub_text(event.id))
        if ident:
            parts.append(f"id: {ident}\n")
    if event.type is EventType.CUSTOM:
        name = truncate_field(_scrub_text(event.name))
        if name:
            parts.append(f"event: {name}\n")
    elif event.type is EventType.ERROR:
        parts.append("event: error\n")
    elif event.type is EventType.DONE:
        parts.append("event: done\n")
    if event.retry is not None and event.retry > 0:
        parts.append(f"retry: {int(event.retry)}\n")
    parts.append(_data_lines(event.data))
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def _data_lines(data: str) -> str:
    data = _scrub_text(data)
    if "\r" in data or "\0" in data:
        # CRLF must still break the line: drop CR, the LF remains.
        data = data.replace("\r", "").replace("\0", "")
    return "".join(f"data: {line}\n" for line in data.split("\n"))


def encode_comment(text: str = "") -> bytes:
    """Encode a comment frame (``: text`` and a blank line).

    Clients ignore comments; they keep proxies and dead-peer detection busy.
    The text is truncated at the first CR/LF/NUL.
    """
    return f": {truncate_field(_scrub_text(text))}\n\n".encode()


def encode_retry(milliseconds: int) -> bytes:
    """Encode a stand-alone ``retry:`` frame, or ``b""`` if not positive."""
    if milliseconds <= 0:
        return b""
    return f"retry: {int(milliseconds)}\n\n".encode()


def json_event(
    obj: Any,
    *,
    name: str = "",
    id: str | None = None,
    type: EventType = EventType.MESSAGE,
    **dumps_kwargs: Any,
) -> Event:
    """Build an :class:`Event` whose data is ``obj`` serialised as compact JSON."""
    dumps_kwargs.setdefault("separators", (",", ":"))
    dumps_kwargs.setdefault("ensure_ascii", False)
    return Event(data=json.dumps(obj, **dumps_kwargs), name=name, id=id, type=type)
