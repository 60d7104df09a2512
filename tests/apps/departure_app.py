"""WSGI app for the departed-client tests (tests/test_departed.py), also run under gunicorn.

``/sse`` is an SSEBroker stream with the default 30 s heartbeat, ``/writer``
an SSEWriter (write-based) stream, ``/chunked`` a generator and
``/chunked-writer`` a ChunkedWriter that send one chunk and then wait a
minute; ``/finite`` sends one chunk, waits ``?ms=``, then a second and ends.
``/count`` answers JSON: subscribers, streams still running, streams whose
``finally`` ran, and this process's open descriptors.
"""

from __future__ import annotations

import json
import os
from typing import Any

import gevent

from gstream import ChunkedWriter, SSEBroker, SSEWriter
from gstream.sse import query_param


class DepartureApp:
    """The app, with its broker and counters (a fresh one per in-process test)."""

    def __init__(self) -> None:
        self.broker = SSEBroker()
        self.state = {"running": 0, "finalized": 0}

    def _waiting(self) -> None:
        self.state["running"] += 1
        try:
            gevent.sleep(60)  # an idle stream: nothing is written for a minute
        finally:
            self.state["running"] -= 1
            self.state["finalized"] += 1

    def _chunks(self) -> Any:
        yield b"first chunk\n"
        self._waiting()
        yield b"never\n"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/sse":
            return self.broker.subscribe(environ, start_response)
        if path == "/writer":
            sse = SSEWriter(environ, start_response)
            sse.write_comment("open")
            self._waiting()
            return sse.close()
        if path == "/chunked":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return self._chunks()
        if path == "/chunked-writer":
            writer = ChunkedWriter(environ, start_response, content_type="text/plain")
            writer.write_chunk(b"first chunk\n")
            self._waiting()
            return writer.close()
        if path == "/finite":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return _finite(float(query_param(environ, "ms") or "0"))
        if path == "/count":
            body = json.dumps(self.counts()).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Length", "0")])
        return []

    def counts(self) -> dict[str, int]:
        """Subscribers, streams waiting, streams finalised, open descriptors."""
        return dict(self.state, subscribers=self.broker.subscriber_count,
                    fds=len(os.listdir("/proc/self/fd")))


def _finite(ms: float) -> Any:
    yield b"one\n"
    gevent.sleep(ms / 1000)
    yield b"two\n"


app = DepartureApp()
