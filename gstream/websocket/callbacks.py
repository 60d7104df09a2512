"""Callback-served WebSocket sessions (:func:`gstream.websocket_callback_app`).

``on_message`` runs in a dispatcher greenlet that lingers a second for the next message, or
with ``in_loop`` straight from the read callback; under gstream's server the session is
detached from its request greenlet, so an idle session holds none. docs/websocket.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

import gevent
from gevent.exceptions import BlockingSwitchOutError
from gevent.hub import Waiter

from ..errors import Closed
from ..tlsio import os_socket

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..hijack import Hijack
    from .config import WSConfig
    from .connection import Message, WebSocket

__all__ = ["CallbackSession", "detached_sessions"]

log = logging.getLogger("gstream.websocket")

#: Seconds a dispatcher waits for the next message before it ends: a chatty
#: client keeps one greenlet (no spawn per message, which cost a chatty echo
#: twice the server CPU of the ``for m in ws`` form), an idle one holds none.
LINGER = 1.0

# Sessions served by callbacks after their request greenlet ended: nothing
# else need hold them (the loop's watchers hold bound methods, but a hub
# membership or the lifecycle registry may be weak).
_detached: set[Any] = set()


def detached_sessions() -> int:
    """How many sessions currently live without their request greenlet."""
    return len(_detached)


def _discard(ws: Any, message: Any) -> None:
    """The message callback of sessions that ignore what clients send."""


class CallbackSession:
    """Mixin of :class:`gstream.websocket.WebSocket`: serving by callbacks."""

    if not TYPE_CHECKING:  # the attributes below are WebSocket's slots
        __slots__ = ()
    else:
        config: WSConfig
        _hijack: Hijack
        _sock: Any
        _raw: Any
        _fd: int
        _loop: Any
        _finalized: bool
        _paused: bool
        _inbound: list[Message]
        _on_message: Callable[[WebSocket, Message], Any] | None
        _dispatcher: gevent.Greenlet | None
        _waiter: Waiter[Any] | None
        _recv_done: bool
        _release: Callable[[], None] | None
        _in_loop: bool

        def close(self, code: int = 1000, reason: str = "", wait: bool = True) -> None: ...
        _pop_inbound: Callable[[], Message]

    def _serve_by_callbacks(self, on_message: Callable[[WebSocket, Message], Any] | None,
                            in_loop: bool = False) -> bool:
        """Hand every future message to ``on_message`` and try to detach.

        Messages are dispatched by a greenlet spawned per burst (it lingers
        LINGER seconds for the next one), so an idle session holds no
        greenlet; with ``in_loop`` a message that finds nothing queued either
        way is handed over from the read callback itself (_call_in_loop).
        Returns True when the connection was detached from the request
        greenlet (gstream's server); False means the caller must keep its
        greenlet until :attr:`closed` is set.
        """
        self._on_message = on_message if on_message is not None else _discard
        self._in_loop = in_loop
        if self._inbound:
            self._kick_dispatch()
        detacher = self._hijack.detacher
        if self._finalized or detacher is None:
            return False
        got = detacher()
        if got is None:
            return False
        sock, self._release = got
        self._sock = sock
        self._raw = os_socket(sock)
        # Drop what ties the session to the finished request (its handler).
        self._hijack.detacher = None
        self._hijack.handler = None
        self._hijack.sock = sock
        self._hijack.pre_read = b""
        _detached.add(self)
        if self._finalized:  # closed while detaching: undo the claim now
            self._close_detached()
        return True

    def _call_in_loop(self, message: Message) -> None:
        # From the read callback, in the hub: nothing is queued either way,
        # so this message is next in order and its replies have room.
        on_message = self._on_message
        assert on_message is not None
        try:
            on_message(cast("WebSocket", self), message)
        except Closed:
            pass
        except Exception as exc:
            self._on_message_failed(on_message, exc)

    def _on_message_failed(self, on_message: Callable[[WebSocket, Message], Any],
                           exc: Exception) -> None:
        # Either way of calling on_message: log why, drop what is queued, close 1011.
        how = ("blocked in the event loop (in_loop=True: it must not block)"
               if isinstance(exc, BlockingSwitchOutError) else "failed")
        log.error("websocket %s: on_message %r %s; closing with 1011", self._fd,
                  getattr(on_message, "__name__", on_message), how, exc_info=exc)
        self._inbound.clear()
        self.close(1011, "internal error", wait=False)  # a no-op once closing

    def _kick_dispatch(self) -> None:
        if self._dispatcher is None and self._on_message is not None:
            self._dispatcher = gevent.spawn(self._dispatch)

    def _dispatch(self) -> None:
        # Hands queued messages to on_message, then lingers up to LINGER for
        # the next one, parked in the connection's reader slot: _feed wakes
        # it at its safe point as it would a greenlet in receive(), and
        # _finalize wakes it to end.
        on_message = self._on_message
        assert on_message is not None
        timer = None
        try:
            while True:
                while self._inbound:
                    on_message(cast("WebSocket", self), self._pop_inbound())
                if self._recv_done or self._finalized or self._waiter is not None:
                    return
                if timer is None:
                    timer = self._loop.timer(LINGER)
                waiter: Waiter[Any] = Waiter()
                self._waiter = waiter
                timer.start(waiter.switch, None)
                try:
                    waiter.get()
                finally:
                    timer.stop()
                    if self._waiter is waiter:
                        self._waiter = None
                if not self._inbound:
                    return  # lingered (or closed): an idle session holds no greenlet
        except Closed:
            pass
        except Exception as exc:
            self._on_message_failed(on_message, exc)
        finally:
            if timer is not None:
                timer.close()
            self._dispatcher = None

    def _close_detached(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        release()
        _detached.discard(self)
        # After the writer (killed with a callback queued just before this
        # one) has left its wait on the descriptor.
        self._loop.run_callback(self._sock.close)
