"""Echo WebSocket app for tests that start real servers (gunicorn) as subprocesses.

``/echo`` uses :func:`gstream.websocket_app`; ``/inline`` uses
:func:`gstream.upgrade` inline and ``/frameworkish`` passes no
``start_response`` (as a Flask or Django view would); any other path answers
a plain ``200`` so the keep-alive connection can be checked afterwards.
"""

from __future__ import annotations

from typing import Any

import gstream

_echo = gstream.websocket_app(lambda ws: [ws.send(m) for m in ws])


def app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ.get("PATH_INFO", "")
    if path == "/echo":
        return _echo(environ, start_response)
    if path in ("/inline", "/frameworkish"):
        try:
            ws = gstream.upgrade(environ, start_response if path == "/inline" else None)
        except gstream.HandshakeError as exc:
            return gstream.reject_response(exc, start_response)
        with ws:
            for m in ws:
                ws.send(f"{path}:{m}" if isinstance(m, str) else m)
        return ws.wsgi_result()
    body = b"plain http\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
