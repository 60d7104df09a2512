"""The ``gstream`` command line (a first version: ``gstream demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gstream`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gstream", description="gstream command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the demo server")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from gevent import monkey

        monkey.patch_all()
        from gevent.pywsgi import WSGIServer

        from .demo_app import make_app

        server = WSGIServer((args.host, args.port), make_app())
        server.start()
        print(f"gstream demo: open http://{args.host}:{server.server_port}/", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
