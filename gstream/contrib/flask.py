"""Serve an :class:`~gstream.broker.SSEBroker` stream from a Flask view.

Example::

    broker = SSEBroker(topic="news")

    @app.get("/events")
    def events():
        return flask_response(broker)
"""

from __future__ import annotations

from flask import Response, request

from ..broker import SSEBroker

__all__ = ["flask_response"]


def flask_response(broker: SSEBroker) -> Response:
    """Return a streaming Flask response subscribed to ``broker``.

    Uses the current request's WSGI environ, so the subscriber id, buffer,
    filter and Last-Event-ID rules are exactly those of ``broker.subscribe``.
    Refusals (503 at the cap, 405) come back as ordinary responses.
    ``direct_passthrough`` keeps Werkzeug from touching the chunks, and the
    body's ``close()`` (called by Werkzeug when the client leaves)
    unregisters the subscriber.
    """
    status, headers, body = broker.stream(request.environ)
    return Response(body, status=status, headers=headers, direct_passthrough=True)
