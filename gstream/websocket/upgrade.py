"""The opening handshake from inside a WSGI application: ``upgrade`` and the WSGI apps.

gstream checks method, version, origin and server support (405/426/403/501) before anything is
written; websockets' ``ServerProtocol.accept`` validates the rest and builds the 101.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import gevent
from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request
from websockets.protocol import OPEN

from .. import hijack as _hijack
from ..errors import Closed, HandshakeError
from ..lifecycle import lifecycle_for
from .config import WSConfig
from .connection import WebSocket
from .protocol import GStreamProtocol

__all__ = ["upgrade", "websocket_app", "websocket_callback_app", "reject_response"]

log = logging.getLogger("gstream.websocket")
_protocol_log = logging.getLogger("gstream.websocket.protocol")

_DEFAULT_CONFIG = WSConfig()


def _header_tokens(environ: dict[str, Any], key: str) -> list[str]:
    return [t.strip().lower() for t in str(environ.get(key, "")).split(",") if t.strip()]


# RFC 9110 5.5 field-value characters: HTAB, visible ASCII, space, obs-text.
# The same rule as websockets' Headers (which checks it from 14 on, not in 13).
_FIELD_VALUE = re.compile("[\t\x20-\x7e\x80-\xff]*").fullmatch


def _request(environ: dict[str, Any]) -> Request:
    """The upgrade request as websockets' ``Request``, from what the server parsed.

    Built directly rather than replayed as bytes for websockets to parse a
    second time (the server has parsed the head already): it matters when
    thousands of clients reconnect at once (docs/websocket.md).
    Header values come from the server's parser and go into no byte stream,
    so nothing here can inject a header. Raises :class:`HandshakeError` (400)
    for a value with characters a field value may not hold (control characters).
    """
    path = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not path:
        path = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "") or "/",
                     safe="/;=,@:+$!*'()~")
        if environ.get("QUERY_STRING"):
            path += "?" + environ["QUERY_STRING"]
    headers = Headers()
    for key, value in environ.items():
        if key.startswith("HTTP_") and isinstance(value, str):
            name = key[5:].replace("_", "-")
            # The server's parser may let control characters through; the
            # replayed head used to be refused by websockets' request parser.
            if _FIELD_VALUE(value) is None:
                raise _refuse(400, f"invalid {name.title()} header")
            headers[name] = value
    return Request(path, headers)


_selectors: dict[tuple[str, ...], Callable[[Any, Sequence[str]], str | None]] = {}


def _selector(preferred: Sequence[str]) -> Callable[[Any, Sequence[str]], str | None] | None:
    """The subprotocol chooser for ``preferred``: None (websockets' default,
    which answers no header) when there is nothing to choose, else one
    shared function per list, not one closure per connection."""
    if not preferred:
        return None
    key = tuple(preferred)
    select = _selectors.get(key)
    if select is None:
        def select(protocol: Any, offered: Sequence[str]) -> str | None:
            for name in key:  # the server's order decides
                if name in offered:
                    return name
            return None  # nothing in common: no header, upgrade still succeeds
        if len(_selectors) < 64:  # bounded: configs are few, but never grow without end
            _selectors[key] = select
    return select


def _refuse(status: int, reason: str) -> HandshakeError:
    return HandshakeError(status, reason)


def upgrade(environ: dict[str, Any], start_response: Any = None,
            config: WSConfig | None = None) -> WebSocket:
    """Answer a WebSocket upgrade request and return the open connection.

    Call it from a WSGI app (``start_response`` lets gstream talk to gevent's
    pywsgi handler directly; frameworks that hide it may pass None). On
    failure nothing is written and :class:`gstream.HandshakeError` is raised
    with the status to answer (400, 403, 405, 426, 501, 503); turn it into a
    response with :func:`reject_response`. After the session, the WSGI app
    must return ``ws.wsgi_result()``.
    """
    config = config or _DEFAULT_CONFIG
    if lifecycle_for(environ).shutting_down:
        raise _refuse(503, "server shutting down")
    if environ.get("REQUEST_METHOD", "GET") != "GET":
        raise _refuse(405, "WebSocket upgrade requires GET")
    if "websocket" not in _header_tokens(environ, "HTTP_UPGRADE"):
        raise _refuse(426, "WebSocket upgrade required")
    if environ.get("SERVER_PROTOCOL", "HTTP/1.1") != "HTTP/1.1":
        # RFC 6455 4.1: the handshake is an HTTP/1.1 request.
        raise _refuse(400, "WebSocket upgrade requires HTTP/1.1")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        raise _refuse(426, "unsupported WebSocket version (13 required)")
    if not config.origin_allowed(environ):
        raise _refuse(403, "origin not allowed")
    try:
        server = _hijack.find_server(environ, start_response)
    except _hijack.Unsupported as exc:
        raise _refuse(501, f"WebSocket not supported by this server: {exc}") from None

    extensions = []
    if config.compression:
        extensions.append(ServerPerMessageDeflateFactory(
            server_max_window_bits=12, compress_settings={"memLevel": 5}))
    protocol = GStreamProtocol(
        extensions=extensions,
        select_subprotocol=_selector(config.subprotocols),
        max_size=config.read_limit,
        logger=_protocol_log,
    )
    response = protocol.accept(_request(environ))
    if response.status_code != 101:
        first = response.body.decode("utf-8", "replace").strip().split("\n")[0]
        detail = first.removeprefix("Failed to open a WebSocket connection: ").rstrip(".")
        # We answered "no Upgrade header" (426) above; anything else websockets
        # refuses as an upgrade problem (e.g. Connection lacks "upgrade") is a
        # malformed upgrade request: 400.
        status = 400 if response.status_code == 426 else response.status_code
        raise _refuse(status, detail or HTTPStatus(status).phrase)
    protocol.send_response(response)
    if protocol.state is OPEN:
        # websockets' parse() generator still waits for a request line: the
        # request never went through it. Restart it in the OPEN state, where
        # it goes straight to frame parsing (websockets does the same after a
        # rejection). Nothing was fed to it, so nothing is lost; the bytes
        # that followed the head reach it through WebSocket._start.
        protocol.parser = protocol.parse()
        next(protocol.parser)
    head = b"".join(protocol.data_to_send())

    taken = _hijack.take(environ, start_response, server)
    ws = WebSocket(protocol, taken, config, environ)
    try:
        with gevent.Timeout(config.handshake_timeout, TimeoutError("handshake write timeout")):
            taken.sock.sendall(head)
    except (OSError, TimeoutError):
        # The socket is ours now; hand back an already-closed connection so
        # the caller's normal "session over" path tells the server so.
        ws.abort("client went away during the handshake")
        return ws
    ws._start(taken.pre_read)
    return ws


def reject_response(exc: HandshakeError, start_response: Any) -> list[bytes]:
    """Send ``exc`` as the HTTP response of a refused upgrade; return the body.

    426 carries ``Sec-WebSocket-Version: 13`` and ``Upgrade: websocket``;
    405 carries ``Allow: GET``; the body is the short reason.
    """
    body = (exc.reason.strip() + "\n").encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8"),
               ("Content-Length", str(len(body))), ("Connection", "close")]
    if exc.status == 426:
        headers += [("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")]
    elif exc.status == 405:
        headers.append(("Allow", "GET"))
    try:
        phrase = HTTPStatus(exc.status).phrase
    except ValueError:
        phrase = "Error"
    start_response(f"{exc.status} {phrase}", headers)
    return [body]


def _accept(environ: dict[str, Any], start_response: Any,
            config: WSConfig | None) -> WebSocket | list[bytes]:
    """The upgraded connection, or the HTTP response refusing it (logged)."""
    try:
        return upgrade(environ, start_response, config)
    except HandshakeError as exc:
        log.info("websocket upgrade refused (%s %s): %s %s", exc.status, exc.reason,
                 environ.get("REMOTE_ADDR", "-"), environ.get("PATH_INFO", ""))
        return reject_response(exc, start_response)


def _call(role: str, fn: Callable[[WebSocket], Any], ws: WebSocket) -> bool:
    """``fn(ws)``; if it raises, log and close with 1011. False if it failed."""
    try:
        fn(ws)
    except Closed:
        pass  # the peer went away while the application was using the connection
    except Exception:
        log.exception("websocket %s %r failed; closing with 1011", role,
                      getattr(fn, "__name__", fn))
        if ws.open:
            ws.close(1011, "internal error")
        return False
    return True


def websocket_app(handler: Callable[[WebSocket], Any],
                  config: WSConfig | None = None) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """A WSGI application that calls ``handler(ws)`` once per connection.

    The connection is closed with 1000 when the handler returns, and with
    1011 (plus a log line) if it raises. A refused handshake gets its HTTP
    status. Echo server: ``websocket_app(lambda ws: [ws.send(m) for m in ws])``.
    """

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        ws = _accept(environ, start_response, config)
        if not isinstance(ws, WebSocket):
            return ws
        _call("handler", handler, ws)
        return ws.wsgi_result()

    return app


def websocket_callback_app(
        on_open: Callable[[WebSocket], Any],
        on_message: Callable[[WebSocket, str | bytes], Any] | None = None,
        config: WSConfig | None = None, *,
        in_loop: bool = False) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """A WSGI application for sessions served by callbacks: no greenlet while idle.

    ``on_open(ws)`` runs in the request's greenlet once the upgrade is done
    (it may block: authenticate, load state, ``hub.register(ws)``). When it
    returns, the connection stays open and the request greenlet ends: under
    gstream's own server the session is detached from it (an idle member of
    a hub then costs a few KiB, not a parked greenlet's stack; it still
    counts under ``max_connections``); under other servers the request
    greenlet waits for the close instead. ``on_message(ws, message)`` is
    called for every message, in order, from a greenlet spawned per burst
    that lingers a second for the next message (so it may block; it is never
    called concurrently for one connection). Without ``on_message`` incoming
    messages are discarded. Register close handling with ``ws.on_close``. If
    a callback raises, the connection is closed with 1011 and the error logged.

    With ``in_loop=True`` a message that finds nothing queued either way (no
    earlier message waiting, no reply waiting to be sent) is handed to
    ``on_message`` straight from the event loop's read callback, with no
    greenlet switch: about a fifth less server CPU per request/response
    round trip (docs/performance.md). ``on_message`` must then not block:
    no sleeps, no blocking I/O or locks, at most ``send_buffer`` sends per
    call (``hub.broadcast`` never blocks). A blocking call raises gevent's
    ``BlockingSwitchOutError``; it is logged and the connection closed with
    1011. Other messages go through the dispatcher greenlet as without
    ``in_loop``, so the order is kept either way.

    A chat room: ``websocket_callback_app(hub.register,
    lambda ws, m: hub.broadcast(m, exclude=ws))``.
    """

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        ws = _accept(environ, start_response, config)
        if not isinstance(ws, WebSocket):
            return ws
        if not _call("on_open", on_open, ws):
            return ws.wsgi_result()
        if ws._serve_by_callbacks(on_message, in_loop):
            return []  # detached: the session lives on without this greenlet
        ws.wait_closed()
        return ws.wsgi_result()

    return app
