"""WSGI app for the keep-alive fairness tests under gunicorn.

Each response body is the order in which the process served it; ``?ms=N``
first burns N ms of CPU without yielding (a view that computes).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

_served = itertools.count(1)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    query = environ.get("QUERY_STRING", "")
    ms = float(query[3:]) if query.startswith("ms=") else 0.0
    end = time.perf_counter() + min(ms, 50.0) / 1000
    while time.perf_counter() < end:
        pass
    body = b"%d" % next(_served)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
