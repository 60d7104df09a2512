"""Graceful shutdown: a registry of live streams a server can end cleanly.

On SIGTERM the server calls :meth:`Lifecycle.shutdown_all`, which asks each
registered stream (SSE subscriber, WebSocket) to end politely and waits up to a
deadline. Streams are held weakly, so one that forgets to unregister cannot leak here.
Each gstream :class:`~gstream.server.Server` has a registry of its own, handed to its streams
in the WSGI environ (:func:`lifecycle_for`); under other servers they use the process-wide one.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Protocol

import gevent

__all__ = ["ENVIRON_KEY", "Drainable", "Lifecycle", "lifecycle", "lifecycle_for"]

log = logging.getLogger("gstream.lifecycle")


class Drainable(Protocol):
    """Anything the server can end gracefully."""

    def shutdown(self, reason: str = "server shutting down") -> None:
        """Start ending the stream politely; must not block for long."""


class Lifecycle:
    """Tracks live streams of one process."""

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[Drainable] = weakref.WeakSet()
        self.shutting_down = False
        """True once :meth:`shutdown_all` has started; new streams should refuse."""

    def register(self, stream: Drainable) -> None:
        """Track ``stream`` until it unregisters (or is garbage collected)."""
        self._streams.add(stream)

    def unregister(self, stream: Drainable) -> None:
        """Stop tracking ``stream``; a no-op if it is not tracked."""
        self._streams.discard(stream)

    def __len__(self) -> int:
        return len(self._streams)

    def shutdown_all(self, timeout: float = 5.0, reason: str = "server shutting down") -> int:
        """Ask every live stream to end, then wait up to ``timeout`` seconds.

        Returns the number of streams still registered when the wait ended
        (0 means every stream ended in time).
        """
        self.shutting_down = True
        for stream in list(self._streams):
            try:
                stream.shutdown(reason)
            except Exception:  # one broken stream must not stop the others
                log.exception("error while shutting down %r", stream)
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            gevent.sleep(0.02)
        return len(self._streams)

    def abort_all(self, reason: str = "shutdown deadline") -> int:
        """Abort every stream still registered that can be aborted (WebSockets
        served by callbacks have no greenlet a server could kill). Returns how many."""
        count = 0
        for stream in list(self._streams):
            abort = getattr(stream, "abort", None)
            if abort is not None:
                try:
                    abort(reason)
                    count += 1
                except Exception:
                    log.exception("error while aborting %r", stream)
        return count

    def reset(self) -> None:
        """Forget the shutting-down state (tests and in-process restarts)."""
        self.shutting_down = False


#: The process-wide registry: streams served by anything but a gstream Server
#: (plain pywsgi, gunicorn's workers) register here.
lifecycle = Lifecycle()

#: The WSGI environ key under which a gstream Server hands its streams its registry.
ENVIRON_KEY = "gstream.lifecycle"


def lifecycle_for(environ: dict[str, Any]) -> Lifecycle:
    """The registry a stream of this request registers with: its server's, else the process-wide one."""
    found = environ.get(ENVIRON_KEY)
    return found if isinstance(found, Lifecycle) else lifecycle
