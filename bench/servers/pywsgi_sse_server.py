"""Peer 3: a plain gevent.pywsgi SSE generator with one gevent Queue per subscriber.

Written the way a Flask/WSGI user would: the publisher puts the message on
every subscriber's queue; each subscriber's generator formats and yields it;
heartbeats come from ``queue.get(timeout=...)``.
"""

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from _base import listen, make_flask_app, simple_response  # noqa: E402
from common import announce_ready, make_payload, parse_publish_query, server_args  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.queue import Empty, Queue  # noqa: E402

args = server_args()
HB = args.heartbeat or None
subscribers: set[Queue] = set()
flask_app = make_flask_app()


def publisher(p: dict) -> None:
    for seq in range(p["n"]):
        msg = make_payload(p["run"], seq, p["size"])
        for q in list(subscribers):
            q.put_nowait(msg)
        gevent.sleep(p["interval"])


def sse(environ, start_response):  # type: ignore[no-untyped-def]
    q: Queue = Queue()
    subscribers.add(q)
    start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])

    def stream():  # type: ignore[no-untyped-def]
        try:
            yield b": open\n\n"
            while True:
                try:
                    msg = q.get(timeout=HB)
                except Empty:
                    yield b": hb\n\n"
                    continue
                yield f"data: {msg}\n\n".encode()
        finally:
            subscribers.discard(q)

    return stream()


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ["PATH_INFO"]
    if path == "/sse":
        return sse(environ, start_response)
    if path == "/view":
        return flask_app(environ, start_response)
    if path == "/publish":
        gevent.spawn(publisher, parse_publish_query(environ.get("QUERY_STRING", "")))
        return simple_response(start_response, b"ok\n")
    return simple_response(start_response, b"not found\n", "404 Not Found")


sock = listen(args.host, args.port)
server = WSGIServer(sock, app, log=None)
announce_ready(sock.getsockname()[1], kinds=["sse"], legacy="sse")
server.serve_forever()
