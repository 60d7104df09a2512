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

__all__ = ["main", "load_app", "check_spec"]


def _patch() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def check_spec(spec: str) -> tuple[str, str]:
    """Split ``module:attribute`` without importing anything (SystemExit if malformed)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"gstream: expected module:app, got {spec!r}")
    return module_name, attr


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (``module:factory()`` calls a factory)."""
    module_name, attr = check_spec(spec)
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


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {value!r}")
    return seconds


def _workers(value: str) -> int:
    from .limits import WORKERS_PER_CPU, max_workers  # stdlib only: safe before monkey-patching

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if not 1 <= n <= max_workers():
        raise argparse.ArgumentTypeError(f"must be between 1 and {max_workers()} "
                                         f"({WORKERS_PER_CPU} x {os.cpu_count() or 1} CPUs), got {n}")
    return n


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
    p.add_argument("--workers", type=_workers, default=1,
                   help="worker processes sharing the port (default 1: this process serves; "
                        "N > 1: a supervisor forks N workers, each importing the app; "
                        "max 4 x CPUs). Memory, and so an in-memory broker or hub, is per "
                        "worker: see docs/redis.md")
    p.add_argument("--worker-timeout", type=_seconds, default=30.0,
                   help="with --workers: seconds a worker's event loop may go without a "
                        "heartbeat (blocked by a CPU-bound or unpatched blocking call) before "
                        "the worker is killed and replaced (default 30; 0 disables)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_connections": args.max_connections, "overflow": args.overflow,
        "certfile": args.certfile, "keyfile": args.keyfile, "access_log": args.access_log,
        "shutdown_timeout": args.shutdown_timeout, "header_timeout": args.header_timeout or None,
        "forwarded_allow_ips": args.forwarded_allow_ips, "backlog": args.backlog,
    }


def _bind_server(app: Any, server: Any) -> None:
    bind = getattr(app, "bind_server", None)
    if callable(bind):  # e.g. the demo, for its "connections" statistic
        bind(server)


def _run(app: Any, args: argparse.Namespace, banner: str) -> int:
    from .server import Server

    server = Server(app, args.host, args.port, **_server_options(args))
    _bind_server(app, server)
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
    # With workers, each line names its process.
    pid = " [%(process)d]" if args.workers > 1 else ""
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=f"%(asctime)s{pid} %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        if args.workers > 1:
            check_spec(args.app)
            return _supervise(lambda: load_app(args.app), args,
                              f"gstream: serving {args.app} on {{url}}")
        app = load_app(args.app)
        return _run(app, args, f"gstream: serving {args.app} on {{url}}")
    from .demo import make_app

    def demo_app() -> Any:
        return make_app(ticker=not args.no_ticker)

    if args.workers > 1:
        # Its rooms, feed and presence live in this process's memory: with
        # workers, a chat message would reach only the tabs of one worker.
        parser.error("the demo runs in one process (its rooms live in memory); "
                     "--workers is for `gstream serve` with a Redis backplane (docs/redis.md)")
    return _run(demo_app(), args, "gstream demo: open {url}/")


def _supervise(load: Any, args: argparse.Namespace, banner: str) -> int:
    """``--workers N``: bind here, import the app in each worker after fork."""
    from .workers import Supervisor

    holder: dict[str, Any] = {}

    def load_in_worker() -> Any:
        holder["app"] = load()
        return holder["app"]

    supervisor = Supervisor(
        host=args.host, port=args.port, workers=args.workers, load_app=load_in_worker,
        ready=lambda sup: print(banner.format(url=sup.url), flush=True),
        on_server=lambda server: _bind_server(holder["app"], server),
        worker_timeout=args.worker_timeout or None,
        **_server_options(args),
    )
    try:
        supervisor.bind()
    except OSError as exc:
        raise SystemExit(f"gstream: cannot listen on {args.host}:{args.port}: {exc}") from None
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
