"""The ``gstream`` command line: ``gstream serve module:app`` and ``gstream demo``.

gevent's monkey-patching is applied first, before the application module is
imported, so that every ``socket``, ``ssl``, ``time.sleep`` and ``threading``
the application (and the libraries it imports) reaches is cooperative.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from .policies import Overflow

__all__ = ["main", "load_app"]


def _patch() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (``module:factory()`` calls a factory)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"gstream: expected module:app, got {spec!r}")
    # Like gunicorn: the current directory is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    call = attr.endswith("()")
    obj: Any = module
    for part in attr.removesuffix("()").split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"gstream: {module_name!r} has no attribute {attr!r}") from None
    if call:
        obj = obj()
    if not callable(obj):
        raise SystemExit(f"gstream: {spec!r} is not a WSGI application")
    return obj


def _allow_ips(value: str) -> str:
    from .proxy import ProxyHeaders  # stdlib only: safe before monkey-patching

    try:
        ProxyHeaders(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _add_server_options(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=default_port, help="port (0 picks a free one)")
    p.add_argument("--max-connections", type=int, default=10_000,
                   help="most connections handled at once (default 10000)")
    p.add_argument("--overflow", choices=[o.value for o in Overflow], default=Overflow.QUEUE.value,
                   help="past the cap: queue in the listen backlog, or reject with 503")
    p.add_argument("--backlog", type=int, default=None,
                   help="listen backlog, where connections wait to be accepted "
                        "(default min(4096, net.core.somaxconn))")
    p.add_argument("--certfile", help="TLS certificate (PEM); serves HTTPS with --keyfile")
    p.add_argument("--keyfile", help="TLS private key (PEM)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds a graceful shutdown may take (default 10)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request head (0 disables)")
    p.add_argument("--forwarded-allow-ips", type=_allow_ips,
                   default=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1"),
                   help="comma-separated proxy addresses/networks whose X-Forwarded-* and "
                        "Forwarded headers are trusted ('*': any; default: $FORWARDED_ALLOW_IPS "
                        "or 127.0.0.1,::1, as in gunicorn)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))


def _run(app: Any, args: argparse.Namespace, banner: str) -> int:
    from .server import Server

    server = Server(
        app, args.host, args.port,
        max_connections=args.max_connections, overflow=args.overflow,
        certfile=args.certfile, keyfile=args.keyfile, access_log=args.access_log,
        shutdown_timeout=args.shutdown_timeout, header_timeout=args.header_timeout or None,
        forwarded_allow_ips=args.forwarded_allow_ips,
        backlog=args.backlog,
    )
    bind = getattr(app, "bind_server", None)
    if callable(bind):  # e.g. the demo, for its "connections" statistic
        bind(server)
    server.start()
    print(banner.format(url=server.url), flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gstream`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gstream",
                                     description="Serve WSGI apps with SSE and WebSockets on gevent.")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="serve a WSGI application (module:app)")
    srv.add_argument("app", help="the application, as module:attribute or module:factory()")
    _add_server_options(srv, 8000)
    demo = sub.add_parser("demo", help="run the demo and print the URL to open")
    _add_server_options(demo, 8000)
    demo.add_argument("--no-ticker", action="store_true",
                      help="do not publish a feed event every second (for load tests)")
    args = parser.parse_args(argv)

    # Patch before anything imports the application (or ssl, threading...).
    _patch()
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        app = load_app(args.app)
        return _run(app, args, f"gstream: serving {args.app} on {{url}}")
    from .demo import make_app

    return _run(make_app(ticker=not args.no_ticker), args, "gstream demo: open {url}/")


if __name__ == "__main__":
    sys.exit(main())
