"""An example WSGI app for the server and CLI tests (served by ``gstream serve``).

* ``/`` says hello; ``/patched`` reports gevent's monkey-patching as JSON;
* ``/slow?t=S`` blocks in a plain ``time.sleep`` (cooperative once patched);
* ``/stream`` is an SSE stream registered with gstream's lifecycle: on
  shutdown it sends a final ``shutdown`` event with a ``retry:`` hint;
* ``/rogue`` is an SSE stream that ignores shutdown (it is cut at the deadline).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import gevent.event
from gevent import monkey

from gstream.errors import Closed
from gstream.events import Event
from gstream.lifecycle import lifecycle
from gstream.sse import SSEWriter

IMPORT_TIME_SOCKET_PATCHED = monkey.is_module_patched("socket")
#: How many ``/slow`` requests the app is inside now (tests wait on it
#: instead of sleeping and hoping the request got there).
SLOW_IN_FLIGHT = [0]


class DrainableStream:
    """The smallest stream honouring gstream's lifecycle protocol."""

    def __init__(self) -> None:
        self.stopping = gevent.event.Event()
        self.reason = ""

    def shutdown(self, reason: str = "server shutting down") -> None:
        self.reason = reason
        self.stopping.set()


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/patched":
        body = json.dumps({
            "socket": monkey.is_module_patched("socket"),
            "time": monkey.is_module_patched("time"),
            "ssl": monkey.is_module_patched("ssl"),
            "at_import": IMPORT_TIME_SOCKET_PATCHED,
        }).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    if path == "/slow":
        SLOW_IN_FLIGHT[0] += 1
        try:
            time.sleep(float(query.get("t", ["1"])[0]))
        finally:
            SLOW_IN_FLIGHT[0] -= 1
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"done\n"]
    if path == "/stream":
        sse = SSEWriter(environ, start_response)
        stream = DrainableStream()
        lifecycle.register(stream)
        try:
            sse.send(Event(data="hello", id="1"))
            while not stream.stopping.wait(0.5):
                sse.write_comment("heartbeat")
            sse.send(Event(data=stream.reason, name="shutdown", retry=1500))
        except Closed:
            pass
        finally:
            lifecycle.unregister(stream)
        return sse.close()
    if path == "/rogue":
        sse = SSEWriter(environ, start_response)
        try:
            sse.write_data("rogue")
            for _ in range(600):
                gevent.sleep(0.1)
                sse.write_comment("still here")
        except Closed:
            pass
        return sse.close()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"hello\n"]
