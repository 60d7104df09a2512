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
    """Tracks live streams: the process-wide registry, or a server's own.

    A server's registry is a child of the process-wide one (``parent``): a
    stream registered with it is in both, so the process-wide registry still
    holds every live stream (``len(lifecycle)``, and its :meth:`shutdown_all`
    reaches them all), while a server's :meth:`shutdown_all` ends its own
    streams and those registered with the parent directly (by hand, or
    served by something else), never another server's.
    """

    def __init__(self, parent: Lifecycle | None = None) -> None:
        self._streams: weakref.WeakSet[Drainable] = weakref.WeakSet()
        self._children: weakref.WeakSet[Lifecycle] = weakref.WeakSet()
        self._stopping = False
        self.parent = parent
        """The registry this one's streams are also registered with, or None."""
        if parent is not None:
            parent._children.add(self)

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown_all` has started here or in the parent
        (until :meth:`reset`); new streams should refuse."""
        return self._stopping or (self.parent is not None and self.parent.shutting_down)

    def register(self, stream: Drainable) -> None:
        """Track ``stream`` until it unregisters (or is garbage collected)."""
        self._streams.add(stream)
        if self.parent is not None:
            self.parent.register(stream)

    def unregister(self, stream: Drainable) -> None:
        """Stop tracking ``stream``; a no-op if it is not tracked."""
        self._streams.discard(stream)
        if self.parent is not None:
            self.parent.unregister(stream)

    def __len__(self) -> int:
        return len(self._streams)

    def _drained_set(self) -> list[Drainable]:
        # Ours, plus the parent's streams that no child registry owns.
        streams = list(self._streams)
        if self.parent is not None:
            mine = set(streams)
            siblings = list(self.parent._children)
            streams += [s for s in list(self.parent._streams) if s not in mine
                        and not any(s in c._streams for c in siblings)]
        return streams

    def shutdown_all(self, timeout: float = 5.0, reason: str = "server shutting down") -> int:
        """Ask every live stream to end, then wait up to ``timeout`` seconds.

        For a server's registry: its own streams and the parent's that no
        server owns. Returns the number of those still registered when the
        wait ended (0 means every stream ended in time).
        """
        self._stopping = True
        streams = self._drained_set()
        for stream in streams:
            try:
                stream.shutdown(reason)
            except Exception:  # one broken stream must not stop the others
                log.exception("error while shutting down %r", stream)
        deadline = time.monotonic() + timeout
        alive = weakref.WeakSet(streams)
        top = self if self.parent is None else self.parent
        while time.monotonic() < deadline and any(s in top._streams for s in alive):
            gevent.sleep(0.02)
        return sum(1 for s in alive if s in top._streams)

    def abort_all(self, reason: str = "shutdown deadline") -> int:
        """Abort every stream still registered that can be aborted (WebSockets
        served by callbacks have no greenlet a server could kill): for a
        server's registry, the same streams :meth:`shutdown_all` ends.
        Returns how many."""
        count = 0
        for stream in self._drained_set():
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
        self._stopping = False


#: The process-wide registry: streams served by anything but a gstream Server
#: (plain pywsgi, gunicorn's workers) register here.
lifecycle = Lifecycle()

#: The WSGI environ key under which a gstream Server hands its streams its registry.
ENVIRON_KEY = "gstream.lifecycle"


def lifecycle_for(environ: dict[str, Any]) -> Lifecycle:
    """The registry a stream of this request registers with: its server's, else the process-wide one."""
    found = environ.get(ENVIRON_KEY)
    return found if isinstance(found, Lifecycle) else lifecycle
