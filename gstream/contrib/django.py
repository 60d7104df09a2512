"""Serve an :class:`~gstream.broker.SSEBroker` stream from a Django view.

Example::

    broker = SSEBroker(topic="news")

    def events(request):
        return django_response(broker, request)
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse, StreamingHttpResponse

from ..broker import SSEBroker

__all__ = ["django_response"]


def django_response(broker: SSEBroker, request: Any) -> HttpResponse | StreamingHttpResponse:
    """Return a streaming Django response subscribed to ``broker``.

    Needs a WSGI deployment (``request.environ``) under gevent (pywsgi or
    gunicorn's gevent worker). Django calls the body's ``close()`` when the
    response is closed, which unregisters the subscriber. Avoid middleware
    that consumes streaming content (e.g. GZipMiddleware on this path).
    """
    status, headers, body = broker.stream(request.environ)
    code = int(status.split(" ", 1)[0])
    if code != 200:
        return HttpResponse(b"".join(body), status=code, headers=dict(headers))
    return StreamingHttpResponse(body, status=code, headers=dict(headers))
