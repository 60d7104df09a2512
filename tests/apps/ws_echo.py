"""A reference WebSocket server (the ``websockets`` package's asyncio one).

Run as a subprocess by tests/test_client_ws.py (asyncio and gevent's
monkey-patching don't mix in one process); prints its port on stdout.
Paths: ``/echo`` echoes; ``/fragments`` sends one message in three
fragments; ``/big?n=N`` sends N bytes; ``/bye`` closes with 1001 after a
greeting; ``/forbidden`` answers 403; ``/silent`` never answers pings
(it stops reading).
"""

import asyncio
import sys
from http import HTTPStatus

from websockets.asyncio.server import serve


async def handler(ws):  # type: ignore[no-untyped-def]
    path = ws.request.path
    if path.startswith("/echo"):
        async for message in ws:
            await ws.send(message)
    elif path.startswith("/fragments"):
        await ws.send(["frag-", "ment-", "ed"])
        await ws.send([b"\x00\x01", b"\x02"])
        await ws.wait_closed()
    elif path.startswith("/big"):
        n = int(path.split("n=", 1)[1])
        await ws.send(b"x" * n)
        await ws.wait_closed()
    elif path.startswith("/bye"):
        await ws.send("hello")
        await ws.close(1001, "going away")
    elif path.startswith("/subprotocol"):
        await ws.send(ws.subprotocol or "")
        await ws.wait_closed()
    elif path.startswith("/count"):
        if path.startswith("/count-on-go"):
            # Wait for the client's go: messages that arrive together with
            # the handshake response are taken in one read, which would
            # blur a backpressure check.
            await ws.recv()
        for i in range(200):
            await ws.send(str(i))
        await ws.wait_closed()


def select_subprotocol(connection, subprotocols):  # type: ignore[no-untyped-def]
    return "chat" if "chat" in subprotocols else None


def process_request(connection, request):  # type: ignore[no-untyped-def]
    if request.path.startswith("/forbidden"):
        return connection.respond(HTTPStatus.FORBIDDEN, "no\n")
    return None


async def main() -> None:
    async with serve(handler, "127.0.0.1", 0, process_request=process_request,
                     select_subprotocol=select_subprotocol, max_size=2 ** 22, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
