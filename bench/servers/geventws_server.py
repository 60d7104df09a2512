"""Peer 2: gevent-websocket's WebSocketHandler on gevent.pywsgi.

Broadcast is the usual loop of ``ws.send`` over the connected clients (the
library has no broadcast API). Heartbeats: one greenlet pings every client
every interval (gevent-websocket has none built in); a lock keeps it and the
publisher from writing the same socket from two greenlets at once.
"""

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from _base import listen, make_flask_app, simple_response  # noqa: E402
from common import announce_ready, make_payload, parse_publish_query, server_args  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

args = server_args()
clients: set = set()
send_lock = Semaphore()
flask_app = make_flask_app()


def publisher(p: dict) -> None:
    for seq in range(p["n"]):
        msg = make_payload(p["run"], seq, p["size"])
        with send_lock:
            for ws in list(clients):
                try:
                    ws.send(msg)
                except Exception:
                    clients.discard(ws)
        gevent.sleep(p["interval"])


def heartbeats(interval: float) -> None:
    while True:
        gevent.sleep(interval)
        with send_lock:
            for ws in list(clients):
                try:
                    ws.send_frame(b"", ws.OPCODE_PING)
                except Exception:
                    clients.discard(ws)


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ["PATH_INFO"]
    ws = environ.get("wsgi.websocket")
    if ws is not None and path == "/ws":
        clients.add(ws)
        try:
            while ws.receive() is not None:
                pass
        except Exception:
            pass
        finally:
            clients.discard(ws)
        return []
    if ws is not None and path == "/echo":
        try:
            while True:
                msg = ws.receive()
                if msg is None:
                    break
                ws.send(msg)
        except Exception:
            pass
        return []
    if path == "/view":
        return flask_app(environ, start_response)
    if path == "/publish":
        gevent.spawn(publisher, parse_publish_query(environ.get("QUERY_STRING", "")))
        return simple_response(start_response, b"ok\n")
    return simple_response(start_response, b"not found\n", "404 Not Found")


if args.heartbeat:
    gevent.spawn(heartbeats, args.heartbeat)
sock = listen(args.host, args.port)
server = WSGIServer(sock, app, log=None, handler_class=WebSocketHandler)
announce_ready(sock.getsockname()[1], kinds=["ws"], echo=True, legacy="ws")
server.serve_forever()
