"""Peer 4: sse-starlette's EventSourceResponse on uvicorn (one asyncio.Queue per subscriber).

Heartbeats are sse-starlette's ``ping``. The legacy Flask view is mounted
through Starlette's WSGIMiddleware (a thread pool), which is how a Flask app
is usually carried into an ASGI server.
"""

import asyncio
import warnings

from _base import listen, make_flask_app
from common import announce_ready, make_payload, parse_publish_query, server_args
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.middleware.wsgi import WSGIMiddleware

import uvicorn

args = server_args()
subscribers: set = set()
tasks: set = set()


async def publisher(p: dict) -> None:
    for seq in range(p["n"]):
        msg = make_payload(p["run"], seq, p["size"])
        for q in list(subscribers):
            q.put_nowait(msg)
        await asyncio.sleep(p["interval"])


async def sse(request):  # type: ignore[no-untyped-def]
    q: asyncio.Queue = asyncio.Queue()
    subscribers.add(q)

    async def stream():  # type: ignore[no-untyped-def]
        try:
            while True:
                yield {"data": await q.get()}
        finally:
            subscribers.discard(q)

    return EventSourceResponse(stream(), ping=args.heartbeat or 3600)


async def publish(request):  # type: ignore[no-untyped-def]
    t = asyncio.get_running_loop().create_task(
        publisher(parse_publish_query(request.url.query))
    )
    tasks.add(t)
    t.add_done_callback(tasks.discard)
    return PlainTextResponse("ok\n")


app = Starlette(
    routes=[
        Route("/sse", sse),
        Route("/publish", publish),
        Route("/view", WSGIMiddleware(make_flask_app())),
    ]
)

sock = listen(args.host, args.port)
config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", backlog=4096)
server = uvicorn.Server(config)
announce_ready(sock.getsockname()[1], kinds=["sse"], legacy="sse")
server.run(sockets=[sock])
