"""Peer 1: the ``websockets`` asyncio server, broadcasting with ``websockets.broadcast``.

Heartbeats are websockets' own ``ping_interval``. ``/publish`` is answered by
``process_request`` (a plain HTTP GET). No permessage-deflate is negotiated:
the load generator does not offer it, as for every WebSocket peer here.
"""

import asyncio
from urllib.parse import urlsplit

from _base import listen
from common import announce_ready, make_payload, parse_publish_query, server_args
from websockets.asyncio.server import broadcast, serve

args = server_args()
subscribers: set = set()
tasks: set = set()


async def publisher(p: dict) -> None:
    for seq in range(p["n"]):
        broadcast(subscribers, make_payload(p["run"], seq, p["size"]))
        await asyncio.sleep(p["interval"])


async def handler(ws) -> None:  # type: ignore[no-untyped-def]
    if ws.request.path.startswith("/echo"):
        async for msg in ws:
            await ws.send(msg)
        return
    subscribers.add(ws)
    try:
        await ws.wait_closed()
    finally:
        subscribers.discard(ws)


def process_request(connection, request):  # type: ignore[no-untyped-def]
    url = urlsplit(request.path)
    if url.path == "/publish":
        t = asyncio.get_running_loop().create_task(publisher(parse_publish_query(url.query)))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        return connection.respond(200, "ok\n")
    return None


async def main() -> None:
    sock = listen(args.host, args.port)
    async with serve(
        handler,
        sock=sock,
        ping_interval=args.heartbeat or None,
        process_request=process_request,
        compression=None,
    ) as server:
        announce_ready(sock.getsockname()[1], kinds=["ws"], echo=True, legacy=None)
        await server.serve_forever()


asyncio.run(main())
