"""Keep-alive fairness: one pass through the event loop between two requests.

A greenlet only gives up the gevent loop when a read or write would block.
A keep-alive client whose next request has already arrived when its response
has gone (a fast client, or a pipelining one) is therefore served again at
once, and every other connection waits. pywsgi's and gunicorn's request loops
both read the next request straight away; gstream's handler and its gunicorn
workers call :func:`yield_to_ready_io` first (pywsgi handlers through
:class:`FairKeepAlive`).

Measured on 2 keep-alive connections to a Flask view (docs/performance.md,
fifth round): p99 6-11 ms with stalls up to ~100 ms before, ~2 ms after, at
~6 us (one ``epoll_wait``) per request.
"""

from __future__ import annotations

from typing import Any

import gevent

__all__ = ["FairKeepAlive", "yield_to_ready_io"]


def _noop() -> None:
    pass


def yield_to_ready_io() -> None:
    """Return after the event loop has polled once and run the I/O that was ready.

    ``gevent.sleep(0)`` would not do: it can resume the caller before the
    loop polls. A ``check`` watcher fires just after a poll; an ``idle``
    watcher keeps that poll from blocking when nothing is ready (the caller's
    next request may already sit in its own read buffer, which no poll sees).
    """
    hub = gevent.get_hub()
    loop = hub.loop
    idle = loop.idle()
    check = loop.check()
    idle.start(_noop)
    try:
        hub.wait(check)
    finally:
        idle.close()
        check.close()


class FairKeepAlive:
    """Mixin for a ``gevent.pywsgi.WSGIHandler`` subclass (put it first among the bases).

    Before each request after the first on a connection (pywsgi keeps the
    previous response's ``status`` until then), lets the loop run once.
    """

    status: Any

    def handle_one_request(self) -> Any:
        if self.status is not None:
            yield_to_ready_io()
        return super().handle_one_request()  # type: ignore[misc]
