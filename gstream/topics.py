"""Topic names, topic patterns and the multi-topic resume cursor (pure, no I/O).

A subscriber of :class:`~gstream.broker.SSEBroker` may ask for several topics
on one stream (``?topic=a&topic=user/*``). This module checks what a client
sends (names, patterns, the ``Last-Event-ID`` cursor) and builds the cursor the
broker sends back; every bound is here. Reasoning: docs/topics.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .errors import TopicError

__all__ = [
    "CURSOR_VERSION",
    "MAX_CURSOR",
    "MAX_TOPIC",
    "MAX_WILDCARDS",
    "Pattern",
    "encode_cursor",
    "event_type",
    "is_pattern",
    "parse_cursor",
    "parse_selectors",
    "check_topic",
]

#: Longest topic name or pattern, in characters (ASCII only).
MAX_TOPIC = 100
#: Most ``*`` segments in one pattern.
MAX_WILDCARDS = 4
#: Longest multi-topic ``Last-Event-ID`` accepted, in characters.
MAX_CURSOR = 4096
#: First field of every cursor; a cursor of another version is refused.
CURSOR_VERSION = "1"

# Letters, digits and - _ . ~ : / @ + ! ; never space, '=', ';', ',', '#',
# '*', '?' or '%' (cursor separators, the event-type suffix, pattern syntax),
# so names travel in a cursor, a query string and an event type unescaped.
_NAME = re.compile(r"[A-Za-z0-9._~:/@+!-]{1,100}")
_PATTERN = re.compile(r"[A-Za-z0-9._~:/@+!*-]{1,100}")  # lengths: MAX_TOPIC
# A position: a broker number or a Redis stream id (ms-seq).
_POSITION = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20})?")
_RESERVED = "gstream."


def check_topic(name: str) -> str:
    """Return ``name`` if it is a valid topic name, else raise :class:`TopicError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TopicError(f"bad topic name {str(name)[:MAX_TOPIC]!r}: 1-{MAX_TOPIC} characters "
                         "of A-Z a-z 0-9 - _ . ~ : / @ + !")
    if name.startswith(_RESERVED):
        raise TopicError(f"bad topic name {name!r}: the prefix 'gstream.' is reserved")
    return name


def is_pattern(selector: str) -> bool:
    """True when ``selector`` is a pattern (has a ``*`` segment)."""
    return "*" in selector


class Pattern:
    """A topic pattern: ``/``-separated segments where ``*`` matches one whole segment.

    ``user/*`` matches ``user/42`` but neither ``user`` nor ``user/42/inbox``;
    ``*/status`` matches ``a/status``. A ``*`` inside a segment (``user*``) is
    refused, as are more than :data:`MAX_WILDCARDS` of them.
    """

    __slots__ = ("text", "segments")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not _PATTERN.fullmatch(text):
            raise TopicError(f"bad topic pattern {str(text)[:MAX_TOPIC]!r}")
        segments = text.split("/")
        stars = 0
        for seg in segments:
            if "*" in seg:
                if seg != "*":
                    raise TopicError(f"bad topic pattern {text!r}: '*' must be a whole segment")
                stars += 1
        if stars == 0:
            raise TopicError(f"bad topic pattern {text!r}: no '*' segment")
        if stars > MAX_WILDCARDS:
            raise TopicError(f"bad topic pattern {text!r}: more than {MAX_WILDCARDS} '*' segments")
        if text.startswith(_RESERVED):
            raise TopicError(f"bad topic pattern {text!r}: the prefix 'gstream.' is reserved")
        self.text = text
        self.segments: tuple[str | None, ...] = tuple(None if s == "*" else s for s in segments)

    def match(self, segments: list[str]) -> bool:
        """Whether a topic, given as its ``/``-split segments, matches."""
        mine = self.segments
        if len(mine) != len(segments):
            return False
        return all(want is None or want == seg for want, seg in zip(mine, segments, strict=True))

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def parse_selectors(values: Iterable[str], max_topics: int) -> list[str]:
    """Check the ``topic`` query values of one request; return them deduplicated, in order.

    Raises:
        TopicError: a bad name or pattern, none at all, or more than ``max_topics``.
    """
    out: list[str] = []
    seen: set[str] = set()
    for raw in values:
        if raw in seen:
            continue
        if len(out) >= max_topics:
            raise TopicError(f"too many topics: at most {max_topics} per stream")
        if is_pattern(raw):
            Pattern(raw)
        else:
            check_topic(raw)
        seen.add(raw)
        out.append(raw)
    if not out:
        raise TopicError("no topic given")
    return out


def encode_cursor(positions: Mapping[str, str]) -> str:
    """The ``id:`` of a multi-topic stream: ``1;sel=pos;sel=pos...`` (selectors in subscribe order)."""
    return CURSOR_VERSION + ";" + ";".join(f"{s}={p}" for s, p in positions.items())


def parse_cursor(raw: str, selectors: Iterable[str]) -> dict[str, str]:
    """Read a multi-topic ``Last-Event-ID``; return the position of each known selector.

    Parts naming a selector the request does not ask for are ignored (the
    client changed its URL); a selector without a part starts fresh.

    Raises:
        TopicError: longer than :data:`MAX_CURSOR`, another version, a part
            that is not ``selector=position``, a bad position, or a selector
            named twice.
    """
    if len(raw) > MAX_CURSOR:
        raise TopicError(f"bad Last-Event-ID: longer than {MAX_CURSOR} characters")
    version, _, rest = raw.partition(";")
    if version != CURSOR_VERSION:
        raise TopicError("bad Last-Event-ID: not a gstream topic cursor (version 1)")
    wanted = set(selectors)
    out: dict[str, str] = {}
    seen: set[str] = set()
    for part in rest.split(";") if rest else ():
        sel, eq, pos = part.partition("=")
        if not eq or not _PATTERN.fullmatch(sel) or not _POSITION.fullmatch(pos):
            raise TopicError(f"bad Last-Event-ID: malformed part {part[:64]!r}")
        if sel in seen:
            raise TopicError(f"bad Last-Event-ID: {sel!r} given twice")
        seen.add(sel)
        if sel in wanted:
            out[sel] = pos
    return out


def event_type(topic: str, name: str) -> str:
    """The SSE ``event:`` of an event of ``topic`` on a multi-topic stream.

    The topic itself for a plain message or an event named like its topic
    (so ``addEventListener(topic)`` routes it), ``topic#name`` for another
    named event.
    """
    return topic if name == "message" or name == topic else f"{topic}#{name}"
