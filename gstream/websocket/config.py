"""WebSocket configuration: limits, timeouts, origin policy, subprotocols.

Every value is validated when the config is built, so a typo fails at import time with a
clear :class:`ValueError` instead of at the first connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..policies import InboundOverflow

__all__ = ["WSConfig", "same_origin", "OriginPolicy", "INBOUND_POLICIES"]

log = logging.getLogger("gstream.websocket")

#: ``check_origin`` may be a callable ``(origin, environ) -> bool``, a list of
#: allowed origins (``"https://app.example"``; ``"*"`` allows any), or None
#: for the default same-origin rule.
OriginPolicy = Callable[[str | None, Mapping[str, Any]], bool]

#: What happens when the application does not call ``receive()`` fast enough
#: and ``max_queue`` complete messages are waiting:
#:
#: - ``"pause"``: stop reading the socket until the application catches up
#:   (TCP backpressure on the peer). Keepalive pings still go out: while one
#:   waits for its pong, reading goes on (at most ``read_limit`` more bytes
#:   per pause) to find the pong behind the unread messages, so a dead peer
#:   is still found. Once the connection is closing, reading goes on the
#:   same way (same budget) to find the peer's Close.
#: - ``"drop"``: keep reading (so pings, pongs and close frames are still
#:   processed) and drop the new message; ``WebSocket.dropped_inbound`` counts.
#: - ``"close"``: close the connection with 1008 (policy violation).
INBOUND_POLICIES = tuple(p.value for p in InboundOverflow)

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# An Origin of ws/wss is not something a browser sends, but normalise it as
# http/https so that a same-origin check against wsgi.url_scheme works.
_SCHEME_ALIASES = {"ws": "http", "wss": "https"}


def _origin_tuple(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, default ports filled in; None if unparseable."""
    try:
        parts = urlsplit(origin.strip())
        scheme = _SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return None
    if not scheme or not host or parts.path not in ("", "/") or parts.query or parts.username:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme, 0)
        if not port:
            return None
    return scheme, host, port


def _request_origin(environ: Mapping[str, Any]) -> tuple[str, str, int] | None:
    scheme = str(environ.get("wsgi.url_scheme", "http")).lower()
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    if not host:
        return None
    return _origin_tuple(f"{scheme}://{host}")


def same_origin(origin: str | None, environ: Mapping[str, Any]) -> bool:
    """The default origin policy.

    A request without ``Origin`` (a non-browser client) passes. Otherwise the
    Origin's scheme, host and port must equal the request's
    (``wsgi.url_scheme`` and ``Host``), with default ports normalised, so
    ``https://h`` matches ``Host: h:443``. ``null`` and unparseable origins
    are refused. Behind a TLS-terminating proxy, ``wsgi.url_scheme`` must be
    ``https``: gstream's server and gunicorn do it from a trusted proxy's
    ``X-Forwarded-Proto`` (``forwarded_allow_ips``, docs/deploy.md).
    """
    if origin is None or origin == "":
        return True
    theirs = _origin_tuple(origin)
    ours = _request_origin(environ)
    return theirs is not None and ours is not None and theirs == ours


def _allow_list(origins: Iterable[str]) -> OriginPolicy:
    allowed = list(origins)
    if "*" in allowed:
        return lambda origin, environ: True
    normalised = set()
    for o in allowed:
        t = _origin_tuple(o)
        if t is None:
            raise ValueError(f"check_origin: {o!r} is not an origin like 'https://host[:port]'")
        normalised.add(t)

    def check(origin: str | None, environ: Mapping[str, Any]) -> bool:
        if origin is None or origin == "":
            return True  # non-browser clients carry no Origin and cannot be hijacked
        t = _origin_tuple(origin)
        return t is not None and t in normalised

    return check


@dataclass
class WSConfig:
    """Settings for WebSocket connections made by :func:`gstream.upgrade`.

    Times are in seconds; ``None`` disables a timeout where noted.
    """

    read_limit: int = 1 << 20
    """Largest incoming message (all fragments, after decompression); larger closes with 1009."""
    send_buffer: int = 32
    """Messages queued for writing before ``send()`` blocks (backpressure)."""
    write_timeout: float | None = 10.0
    """A write that makes no progress for this long means the peer stopped reading: close."""
    check_origin: OriginPolicy | Sequence[str] | None = None
    """None: same-origin (see :func:`same_origin`); a list of allowed origins; or a callable."""
    read_idle_timeout: float | None = 60.0
    """After this long without an incoming frame, send a ping. None disables keepalive."""
    pong_timeout: float = 10.0
    """A ping unanswered for this long closes the connection with 1011."""
    close_timeout: float = 1.0
    """How long to wait for the peer's reciprocal close (and its TCP close)."""
    handshake_timeout: float = 10.0
    """Bound on sending the 101 response (the request head is read by the server)."""
    subprotocols: Sequence[str] = ()
    """Supported subprotocols in the server's order of preference."""
    on_close: Callable[[Any], None] | None = None
    """Called once with the WebSocket after it is fully closed."""
    compression: bool = False
    """Negotiate permessage-deflate (window bits 12, memLevel 5: tens of KiB per connection, docs/performance.md)."""
    max_queue: int = 16
    """Complete incoming messages buffered for ``receive()``."""
    inbound_overflow: InboundOverflow | str = InboundOverflow.PAUSE
    """Policy when ``max_queue`` is reached: an :class:`~gstream.policies.InboundOverflow`."""
    _origin_check: OriginPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.read_limit, int) or self.read_limit < 1:
            raise ValueError(f"read_limit must be a positive int, got {self.read_limit!r}")
        if not isinstance(self.send_buffer, int) or self.send_buffer < 1:
            raise ValueError(f"send_buffer must be a positive int, got {self.send_buffer!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 1:
            raise ValueError(f"max_queue must be a positive int, got {self.max_queue!r}")
        for name in ("write_timeout", "read_idle_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None (disabled), got {value!r}")
        for name in ("pong_timeout", "close_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.inbound_overflow = InboundOverflow.parse(self.inbound_overflow, "inbound_overflow")
        if isinstance(self.subprotocols, str):
            raise ValueError("subprotocols must be a list of names, not a string")
        self.subprotocols = tuple(self.subprotocols)
        for p in self.subprotocols:
            if not p or any(c in p for c in ' ,;"\r\n\t'):
                raise ValueError(f"invalid subprotocol name {p!r}")
        if self.on_close is not None and not callable(self.on_close):
            raise ValueError("on_close must be callable")
        co = self.check_origin
        if co is None:
            self._origin_check = same_origin
        elif callable(co):
            self._origin_check = co
        elif isinstance(co, str):
            raise ValueError("check_origin must be a list of origins, a callable or None")
        else:
            self._origin_check = _allow_list(co)

    def origin_allowed(self, environ: Mapping[str, Any]) -> bool:
        """Apply the origin policy to a WSGI request (a raising callable refuses)."""
        origin = environ.get("HTTP_ORIGIN")
        try:
            return bool(self._origin_check(origin, environ))
        except Exception:
            log.exception("check_origin raised; refusing the upgrade")
            return False
