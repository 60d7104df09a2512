"""Keep-alive fairness: one pass through the event loop between two requests.

Used by gstream's handler and gunicorn workers so that a client whose next
request has already arrived cannot hold the loop (docs/design.md, "A keep-alive
connection gives the loop back between requests"; figures in docs/performance.md).
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
