"""Exceptions raised by gstream, all in one place."""

from __future__ import annotations

__all__ = ["GStreamError", "Closed", "BrokerClosed", "HandshakeError", "SubscriberLimit",
           "BackplaneUnavailable"]


class GStreamError(Exception):
    """Base class of every exception gstream raises on purpose."""


class Closed(GStreamError):
    """The stream or connection is closed; nothing more can be written or read.

    Raised by every write to a closed SSE stream, chunked stream or
    WebSocket, and by ``receive()`` on a closed WebSocket.

    Attributes:
        code: the WebSocket close code when there is one (``None`` for HTTP
            streams, or when the peer sent no code).
        reason: the close reason or a short explanation.
    """

    def __init__(self, reason: str = "closed", code: int | None = None) -> None:
        super().__init__(reason if code is None else f"{code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class BrokerClosed(Closed):
    """The broker or hub has been closed: publishes and subscribes are refused."""


class HandshakeError(GStreamError):
    """A WebSocket upgrade was refused.

    Attributes:
        status: the HTTP status code sent (or to send) to the client.
        reason: a short explanation, also sent as the response body.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class SubscriberLimit(GStreamError):
    """A broker or hub reached its configured maximum number of members."""


class BackplaneUnavailable(GStreamError):
    """A cross-process backplane (Redis) did not accept a publish or broadcast.

    Nothing was delivered, in any process. The caller may retry (a web
    endpoint would typically answer 503). Raised when the transport is known
    to be down, refused the event, or the backplane's bounded outbound queue
    is full (a stalled Redis): see docs/redis.md, "Faults".
    """
