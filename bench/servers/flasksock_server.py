"""Peer 5: Flask-Sock (simple-websocket) under gevent.pywsgi, monkey-patched.

Heartbeats use Flask-Sock's own ``ping_interval``; broadcast is a loop of
``ws.send`` over the registered clients.
"""

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from _base import listen, make_flask_app  # noqa: E402
from common import announce_ready, make_payload, parse_publish_query, server_args  # noqa: E402
from flask import request  # noqa: E402
from flask_sock import ConnectionClosed, Sock  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

args = server_args()
app = make_flask_app()
if args.heartbeat:
    app.config["SOCK_SERVER_OPTIONS"] = {"ping_interval": args.heartbeat}
sock = Sock(app)
clients: set = set()


def publisher(p: dict) -> None:
    for seq in range(p["n"]):
        msg = make_payload(p["run"], seq, p["size"])
        for ws in list(clients):
            try:
                ws.send(msg)
            except Exception:
                clients.discard(ws)
        gevent.sleep(p["interval"])


@sock.route("/ws")
def ws_subscriber(ws):  # type: ignore[no-untyped-def]
    clients.add(ws)
    try:
        while True:
            ws.receive()
    except ConnectionClosed:
        pass
    finally:
        clients.discard(ws)


@sock.route("/echo")
def ws_echo(ws):  # type: ignore[no-untyped-def]
    try:
        while True:
            ws.send(ws.receive())
    except ConnectionClosed:
        pass


@app.route("/publish")
def publish():  # type: ignore[no-untyped-def]
    gevent.spawn(publisher, parse_publish_query(request.query_string.decode()))
    return "ok\n"


listener = listen(args.host, args.port)
server = WSGIServer(listener, app, log=None)
announce_ready(listener.getsockname()[1], kinds=["ws"], echo=True, legacy="ws")
server.serve_forever()
