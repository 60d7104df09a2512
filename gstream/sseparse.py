"""A WHATWG-conformant ``text/event-stream`` parser (pure, no I/O).

It follows the HTML standard's "interpreting an event stream" algorithm (line
ends, BOM, ``data`` accumulation, ``id`` with NUL ignored, digits-only ``retry``).
Used by :mod:`gstream.client` and by the tests, so the library is checked against
the standard, not against itself.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

__all__ = ["ParsedEvent", "EventStreamParser", "parse_stream"]


@dataclass(frozen=True)
class ParsedEvent:
    """An event as a browser's ``EventSource`` would dispatch it."""

    data: str
    event: str = "message"
    last_event_id: str = ""
    """The stream's last event id when this event was dispatched."""
    id_field_seen: bool = False
    """True when this event's own frame carried an ``id:`` field."""


class EventStreamParser:
    """Incremental event-stream parser.

    Args:
        max_line: the longest line accepted, in characters. A longer line
            raises :class:`ValueError` so a hostile server cannot grow the
            client's memory without bound.
    """

    def __init__(self, max_line: int = 1 << 20) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._started = False
        self._pending_cr = False
        self._data: list[str] = []
        self._event_type = ""
        self._id_seen = False
        self.last_event_id = ""
        """The last event id string, as the standard defines it."""
        self.retry: int | None = None
        """The most recent valid ``retry:`` value in milliseconds, if any."""
        self.comments: list[str] = []
        """Comments seen since the last call to :meth:`take_comments`."""
        self.max_line = max_line

    def take_comments(self) -> list[str]:
        """Return and forget the comments seen so far."""
        out, self.comments = self.comments, []
        return out

    def feed(self, chunk: bytes) -> list[ParsedEvent]:
        """Parse ``chunk`` and return the events it completed, in order."""
        text = self._decoder.decode(chunk)
        if not self._started:
            if not text:
                return []
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._pending_cr:
            # A CR ended the previous chunk; an LF right after it is part of
            # the same line terminator.
            self._pending_cr = False
            if text.startswith("\n"):
                text = text[1:]
        data = self._buf + text
        events: list[ParsedEvent] = []
        start = 0
        n = len(data)
        while start < n:
            i_lf = data.find("\n", start)
            i_cr = data.find("\r", start)
            if i_lf == -1 and i_cr == -1:
                break
            if i_cr == -1 or (i_lf != -1 and i_lf < i_cr):
                end, nxt = i_lf, i_lf + 1
            else:
                end = i_cr
                if i_cr + 1 < n:
                    nxt = i_cr + 2 if data[i_cr + 1] == "\n" else i_cr + 1
                else:
                    nxt = i_cr + 1
                    self._pending_cr = True
            ev = self._line(data[start:end])
            if ev is not None:
                events.append(ev)
            start = nxt
        self._buf = data[start:]
        if len(self._buf) > self.max_line:
            raise ValueError(f"event-stream line longer than {self.max_line} characters")
        return events

    def _line(self, line: str) -> ParsedEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            self.comments.append(line[1:].removeprefix(" "))
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event_type = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
                self._id_seen = True
        elif field == "retry" and value and value.isascii() and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ParsedEvent | None:
        id_seen, self._id_seen = self._id_seen, False
        if not self._data:
            self._event_type = ""
            return None
        ev = ParsedEvent(
            data="\n".join(self._data),
            event=self._event_type or "message",
            last_event_id=self.last_event_id,
            id_field_seen=id_seen,
        )
        self._data = []
        self._event_type = ""
        return ev


def parse_stream(raw: bytes) -> list[ParsedEvent]:
    """Parse a whole stream at once and return every dispatched event."""
    return EventStreamParser().feed(raw)
