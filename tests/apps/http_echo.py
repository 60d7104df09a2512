"""A WSGI app that echoes what it was given, for tests/test_http_strict.py.

The body is ``METHOD PATH`` then one ``NAME=VALUE`` line for each request
header (the environ's ``HTTP_*``, ``CONTENT_*``) and the request body
after an empty line. ``CALLS`` counts the requests that reached it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CALLS = [0]


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """Echo the request as the application sees it."""
    CALLS[0] += 1
    body = environ["wsgi.input"].read()
    lines = [f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}"]
    for key in sorted(environ):
        if key.startswith(("HTTP_", "CONTENT_")):
            lines.append(f"{key}={environ[key]}")
    out = "\n".join(lines).encode("latin-1") + b"\n\n" + body
    start_response("200 OK", [("Content-Type", "text/plain; charset=latin-1"),
                              ("Content-Length", str(len(out)))])
    return [out]
