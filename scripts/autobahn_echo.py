"""The echo server scripts/autobahn.sh runs the Autobahn|Testsuite against.

A user-written echo handler (``for m in ws: ws.send(m)``) under gstream's own
:class:`gstream.Server`, configured as the suite needs: permessage-deflate on,
16 MiB messages (9.1.6/9.2.6), keepalive off (the suite counts an unsolicited
ping as an event), a short close timeout.

Usage: python scripts/autobahn_echo.py [--host 127.0.0.1] [--port 9001] [--no-compression]
"""

from __future__ import annotations

import argparse
import logging

import gstream
from gstream import WSConfig, websocket_app


def echo(ws: gstream.WebSocket) -> None:
    """Send every message back as it came (text as text, binary as binary)."""
    for message in ws:
        ws.send(message)


def main() -> None:
    """Parse the arguments and serve until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--no-compression", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    config = WSConfig(read_limit=1 << 24, compression=not args.no_compression,
                      read_idle_timeout=None, close_timeout=1.0)
    server = gstream.Server(websocket_app(echo, config), host=args.host, port=args.port)
    print(f"gstream echo server on ws://{args.host}:{server.port}/ "
          f"(compression={not args.no_compression}, read_limit=16 MiB, keepalive off)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
