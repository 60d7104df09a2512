"""Reaching a gevent hub's thread from native OS threads.

gevent primitives (events, queues, sockets) belong to the thread whose hub
created them and are not thread-safe. The one call that is, is
``loop.run_callback_threadsafe``: it queues a callback and wakes the loop.
:class:`LoopBinding` wraps it for objects (a broker, a hub) that must accept
calls from any thread: it remembers the creating thread (re-binding after a
fork), tells whether the caller is in it, and can run a function there and
hand the result back to a waiting native thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent.monkey import get_original

__all__ = ["LoopBinding", "get_ident", "allocate_lock"]

T = TypeVar("T")

#: The real thread id and lock, even under monkey-patching (a patched lock
#: would be a gevent one, useless for a native thread waiting on the hub).
get_ident: Callable[[], int] = get_original("_thread", "get_ident")
allocate_lock: Callable[[], Any] = get_original("_thread", "allocate_lock")


class LoopBinding:
    """The gevent loop (and thread) an object was created in."""

    __slots__ = ("pid", "thread", "loop")

    def __init__(self) -> None:
        self.bind()

    def bind(self) -> None:
        """Bind to the calling thread's hub."""
        self.pid = os.getpid()
        self.thread = get_ident()
        self.loop: Any = gevent.get_hub().loop

    def here(self) -> bool:
        """True when called from the bound thread (re-binds in a forked child)."""
        if os.getpid() != self.pid:
            self.bind()  # forked after construction (e.g. gunicorn preload_app)
        return get_ident() == self.thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` as a loop callback in the bound thread; from any thread.

        The callback runs in the hub greenlet, so it must not block.
        """
        self.loop.run_callback_threadsafe(fn, *args)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run ``fn(*args)`` in a greenlet of the bound thread and return its result.

        From the bound thread this is a plain call. From another thread, that
        thread waits (on a real lock, not a gevent one) for the result, at
        most ``timeout`` seconds (:class:`TimeoutError`); exceptions are
        re-raised in the caller.
        """
        if self.here():
            return fn(*args)
        done = allocate_lock()
        done.acquire()
        box: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the waiting thread
                box.append((False, exc))
            finally:
                done.release()

        self.call_soon(gevent.spawn, run)
        if not done.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError(f"{getattr(fn, '__name__', fn)!s} did not run in the hub's thread in time")
        ok, value = box[0]
        if ok:
            return value
        raise value
