"""Exceptions raised by gstream, all in one place.

Every exception gstream raises on purpose derives from :class:`GStreamError`,
except :class:`ClientDeparted`, which must not be an ``Exception`` (see its
docstring). Other modules re-export the ones their users expect there.
"""

from __future__ import annotations

from greenlet import GreenletExit

__all__ = ["GStreamError", "Closed", "BrokerClosed", "HandshakeError", "InvalidRequest", "BackplaneUnavailable",
           "ClientDeparted", "Unsupported", "HTTPError", "SSEError",
           "MissedEvents", "DuplicateEvent", "Disconnected", "TopicError", "PresenceRefused"]


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


class InvalidRequest(GStreamError, ValueError):
    """An HTTP/1.1 request head that gstream's servers refuse (see gstream.httpcheck).

    A ``ValueError`` too, so a plain pywsgi handler that meets one treats it
    as bad client input (a 400 without a traceback).

    Attributes:
        status: the HTTP status code to answer with (400, 431, 501 or 505).
        reason: a short explanation, also sent as the response body. It
            names a header only once the name has been checked to be a token.
        rule: the section of RFC 9112 or RFC 9110 that the request breaks.
    """

    def __init__(self, status: int, reason: str, rule: str) -> None:
        super().__init__(f"{status} {reason} ({rule})")
        self.status = status
        self.reason = reason
        self.rule = rule


class BackplaneUnavailable(GStreamError):
    """A cross-process backplane (Redis) did not accept a publish or broadcast.

    Nothing was delivered, in any process. The caller may retry (a web
    endpoint would typically answer 503). Raised when the transport is known
    to be down, refused the event, or the backplane's bounded outbound queue
    is full (a stalled Redis): see docs/redis.md, "Faults".
    """


class ClientDeparted(GreenletExit):
    """The client of a streaming response closed (FIN) or reset (RST) its connection.

    Raised by gstream's servers inside the greenlet serving the response,
    wherever it waits (an idle SSE stream, a generator's sleep), so the
    application's ``finally`` blocks run at once instead of at the next
    write. Like :class:`gevent.GreenletExit` (its base) it is not an
    ``Exception``: an ``except Exception`` in the application does not
    swallow it. The server catches it and closes the connection quietly.
    See docs/server.md ("Departed clients").
    """


class Unsupported(GStreamError):
    """The WSGI server does not expose its socket in a way gstream knows how to take."""


# -- clients (gstream.client) ----------------------------------------------


class HTTPError(GStreamError, OSError):
    """The server answered with a response a gstream client cannot use.

    Also an :class:`OSError`, so code that retries on connection errors
    treats a malformed response the same way.

    Attributes:
        status: the HTTP status (0 when the response was malformed).
        reason: a short explanation.
        headers: the response headers, when there were any.
    """

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status = status
        self.reason = reason
        self.headers = headers or {}


class SSEError(GStreamError):
    """The server refused the event stream for good (EventSource "fail the connection").

    Raised by :class:`gstream.client.SSEClient` for a status other than 200,
    204, a redirect or ``5xx``, for a ``200`` whose ``Content-Type`` is not
    ``text/event-stream``, and for a line longer than ``max_line``.

    Attributes:
        status: the HTTP status (0 when the failure is not an HTTP status).
        reason: a short explanation.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}" if status else reason)
        self.status = status
        self.reason = reason


# -- load testing (gstream.contrib.locust) ---------------------------------
# Never raised: reported to Locust as the exception of a failed pseudo-request.


class MissedEvents(GStreamError):
    """Reported (as the failure of ``missed``) when event ids skip numbers."""


class DuplicateEvent(GStreamError):
    """Reported (as the failure of ``duplicate``) when an event id repeats or goes back."""


class Disconnected(GStreamError):
    """Reported (as the failure of ``disconnect``) when an open connection breaks."""


class TopicError(GStreamError, ValueError):
    """A topic name, topic pattern or topic cursor that gstream refuses.

    Raised by :meth:`gstream.broker.SSEBroker.publish` for a bad topic name;
    a subscriber asking for one gets a ``400`` whose body is this message
    (rules: docs/topics.md).
    """


class PresenceRefused(GStreamError, ValueError):
    """A presence join was refused (see :mod:`gstream.presence`).

    Attributes:
        reason: why, one of ``"member id"`` (empty or longer than the
            bound), ``"meta"`` (not JSON, or larger than the bound),
            ``"topic full"`` (``max_members`` members), ``"connections"``
            (that member already has ``max_connections``), ``"topics"``
            (``max_topics`` topics), ``"topic"`` (not valid UTF-8),
            ``"local"`` (this process holds
            ``max_local`` connections) or ``"closed"``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"presence refused: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
