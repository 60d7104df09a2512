"""Taking the raw socket away from a WSGI server, one server at a time.

WSGI has no standard way to take over a connection, so each supported server
(:class:`ServerKind`: gstream's own, gevent's pywsgi, gunicorn's gevent worker) is
detected explicitly and handled the way its source allows (docs/websocket.md,
"Hijack"). After the session gstream shuts the socket down but leaves closing the
descriptor to the server that owns it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent.socket

from .errors import Unsupported
from .tlsio import tls_would_block
from .types import StrEnum

if TYPE_CHECKING:
    from gevent.pywsgi import WSGIHandler

__all__ = ["CLOSED_READER", "SWITCHED_READER", "Hijack", "ServerKind", "Unsupported",
           "drain_buffered", "empty_input", "find_server", "is_switched", "mark_switched", "take"]

#: A shared, closed, empty reader: put in place of a handler's rfile so the
#: keep-alive loop ends and the real read buffer can be freed.
CLOSED_READER = io.BytesIO()
CLOSED_READER.close()
#: The same, put in place of the rfile of a connection that switched
#: protocols (:func:`mark_switched`): ``rfile is SWITCHED_READER`` is the mark.
SWITCHED_READER = io.BytesIO()
SWITCHED_READER.close()
_empty_input: Any = None


class ServerKind(StrEnum):
    """The servers whose connection gstream knows how to take (docs/websocket.md, "Hijack")."""

    GSTREAM = "gstream"
    """gstream's own :class:`~gstream.handler.GStreamHandler` (``environ["gstream.hijack"]``)."""
    PYWSGI = "pywsgi"
    """gevent's ``WSGIHandler``, reached through ``start_response``."""
    PYWSGI_INPUT = "pywsgi-input"
    """gevent's pywsgi when a framework hides ``start_response``: through ``wsgi.input``."""
    GUNICORN = "gunicorn"
    """gunicorn's async ``gevent`` worker (``environ["gunicorn.socket"]``)."""


@dataclass
class Hijack:
    """A socket taken from the server, with the bytes it had already read."""

    sock: gevent.socket.socket
    pre_read: bytes
    server: ServerKind
    handler: WSGIHandler | None = None
    detacher: Callable[[], tuple[gevent.socket.socket, Callable[[], None]] | None] | None = None
    """gstream's server only: lets the session outlive the request greenlet
    (see :meth:`GStreamHandler.detach`); None elsewhere."""

    def wsgi_result(self) -> list[bytes]:
        """The value the WSGI app must return once the session is over.

        Under gunicorn's async worker this raises ``StopIteration`` instead:
        that is how gunicorn is told the response was handled (its worker
        catches it, logs at debug level and closes the connection).
        """
        if self.server == ServerKind.GUNICORN:
            raise StopIteration("websocket session ended")
        return []


def _handler_of(start_response: Any) -> WSGIHandler | None:
    owner = getattr(start_response, "__self__", None)
    # Imported lazily: importing gevent.pywsgi loads ssl, which must wait
    # until the application has been monkey-patched.
    pywsgi = sys.modules.get("gevent.pywsgi")
    if pywsgi is None:
        return None
    return owner if isinstance(owner, pywsgi.WSGIHandler) else None


def find_server(environ: Mapping[str, Any], start_response: Any) -> ServerKind:
    """Name the server behind this request, or raise :class:`Unsupported`.

    Side-effect free, so the upgrade can be refused with a normal HTTP
    response before anything is taken.
    """
    if callable(environ.get("gstream.hijack")):
        return ServerKind.GSTREAM
    if "gunicorn.socket" in environ:
        if not isinstance(environ["gunicorn.socket"], gevent.socket.socket):
            raise Unsupported("gunicorn worker is not gevent-based; use -k gevent")
        return ServerKind.GUNICORN
    if _handler_of(start_response) is not None:
        return ServerKind.PYWSGI
    raw = _raw_socket_from_input(environ)
    if raw is not None:
        return ServerKind.PYWSGI_INPUT
    raise Unsupported("this WSGI server does not expose its connection")


def _raw_socket_from_input(environ: Mapping[str, Any]) -> Any:
    # pywsgi hands upgrade requests the raw buffered reader itself; this is
    # the only way in when a framework hides start_response (Flask, Django).
    if not str(environ.get("SERVER_SOFTWARE", "")).startswith("gevent"):
        return None
    rfile = environ.get("wsgi.input")
    rfile = getattr(rfile, "rfile", rfile)  # pywsgi.Input wraps the reader
    sock = getattr(getattr(rfile, "raw", None), "_sock", None)
    return (rfile, sock) if isinstance(sock, gevent.socket.socket) else None


def drain_buffered(rfile: Any, sock: gevent.socket.socket) -> bytes:
    """Bytes the server's buffered reader already holds, without blocking.

    ``read1`` returns buffered bytes when there are any and otherwise does
    one raw read; with the socket's timeout at 0 that raw read cannot block
    (it returns nothing, or what the kernel already has).
    """
    if rfile is None or getattr(rfile, "closed", True) or not hasattr(rfile, "read1"):
        return b""
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    chunks: list[bytes] = []
    try:
        while True:
            data = rfile.read1(65536)
            if not data:
                break
            chunks.append(data)
            if len(chunks) > 16:  # bounded: at most a little over 1 MiB pre-read
                break
    except (TimeoutError, BlockingIOError):
        pass  # nothing more without waiting; keep what was read
    except OSError as exc:
        if not tls_would_block(exc):  # over TLS "nothing more yet" is SSLWantReadError
            raise
    finally:
        sock.settimeout(previous)
    return b"".join(chunks)


def empty_input() -> Any:
    """One shared, empty ``gevent.pywsgi.Input`` (content length 0) over :data:`CLOSED_READER`.

    Reads return ``b""`` without touching a reader and pywsgi's discard of
    the body reads nothing: the request body of a connection whose reader was
    given back. (Made on first use: importing gevent.pywsgi loads ssl, which
    ``import gstream`` must not do before the application is monkey-patched.)
    """
    global _empty_input
    if _empty_input is None:
        from gevent.pywsgi import Input

        _empty_input = Input(CLOSED_READER, 0)
    return _empty_input


def is_switched(handler: WSGIHandler) -> bool:
    """Whether :func:`mark_switched` marked ``handler``'s connection."""
    return handler.rfile is SWITCHED_READER


def mark_switched(handler: WSGIHandler, environ: Any) -> None:
    """Make pywsgi treat ``handler``'s response as a sent ``101`` on a connection to close.

    Its ``process_result()`` then writes nothing and the access log says 101.
    The reader becomes :data:`SWITCHED_READER` (pywsgi's keep-alive loop
    checks ``rfile.closed``; the real reader and its buffer go once environ
    lets go) and the request body :func:`empty_input`, which pywsgi's discard
    after the application returns never reads.
    """
    handler.status = b"101 Switching Protocols"
    handler._orig_status = "101 Switching Protocols"
    handler.headers_sent = True
    handler.response_use_chunked = False
    handler.close_connection = True
    handler.rfile = SWITCHED_READER
    body = empty_input()
    if isinstance(environ, dict):
        environ["wsgi.input"] = body
    handler.wsgi_input = body


def take(environ: Any, start_response: Any, server: ServerKind | str) -> Hijack:
    """Take the connection from ``server`` (as named by :func:`find_server`).

    Raises:
        ValueError: ``server`` names no :class:`ServerKind`.
    """
    server = ServerKind.parse(server, "server")
    if server == ServerKind.GSTREAM:
        hijack = environ["gstream.hijack"]
        sock, pre = hijack()
        # GStreamHandler.detach, of the handler whose bound method hijack is.
        detacher = getattr(getattr(hijack, "__self__", None), "detach", None)
        return Hijack(sock, pre, server, detacher=detacher)
    if server == ServerKind.GUNICORN:
        sock = environ["gunicorn.socket"]
        pre = b""
        body = environ.get("wsgi.input")
        unreader = getattr(getattr(body, "reader", None), "unreader", None)
        if unreader is not None:
            take_buffered: Callable[[], bytes] | None = getattr(unreader, "take_buffered", None)
            if take_buffered is not None:
                pre = take_buffered()
            elif isinstance(getattr(unreader, "buf", None), io.BytesIO):  # gunicorn < 23
                pre = unreader.buf.getvalue()
                unreader.buf = io.BytesIO()
        sock.setblocking(True)
        return Hijack(sock, pre, server)
    if server == ServerKind.PYWSGI:
        handler = _handler_of(start_response)
        assert handler is not None
        sock = handler.socket
        pre = drain_buffered(handler.rfile, sock)
        mark_switched(handler, environ)
        return Hijack(sock, pre, server, handler)
    # ServerKind.PYWSGI_INPUT, the one left
    found = _raw_socket_from_input(environ)
    if found is None:
        raise Unsupported("pywsgi reader vanished")
    rfile, sock = found
    pre = drain_buffered(rfile, sock)
    rfile.close()  # ends pywsgi's keep-alive loop (it checks rfile.closed)
    return Hijack(sock, pre, server)
