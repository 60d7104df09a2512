"""The WSGI entry point: Django, with WebSocket endpoints routed in front of it.

A WebSocket session takes the connection over and must end the WSGI call
with ``ws.wsgi_result()`` (under gunicorn that raises ``StopIteration``,
which Django's view machinery would turn into a 500), so WebSocket
endpoints are plain WSGI apps routed before Django sees the request.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from django.core.wsgi import get_wsgi_application

from gstream import WebSocket, websocket_app

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

django_app = get_wsgi_application()


def echo(ws: WebSocket) -> None:
    for message in ws:
        ws.send(message)


WEBSOCKETS = {"/ws": websocket_app(echo)}


def application(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    endpoint = WEBSOCKETS.get(environ.get("PATH_INFO", ""))
    if endpoint is not None:
        return endpoint(environ, start_response)
    return django_app(environ, start_response)
